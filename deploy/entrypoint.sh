#!/bin/sh
# Entry point of the fedfm image: `fedfm-role ROLE`, configured by environment variables.
#
#   superlink   the coordinator: Flower SuperLink with TLS, node authentication and a state
#               database; it runs the ServerApp as its subprocess (results go to /runs)
#   supernode   one hospital: Flower SuperNode with its private key and node config; it runs the
#               ClientApp as its subprocess next to the site's data (/data, read-only) and ledger
#   register    operator, one-shot: register every site public key found in $KEYS_DIR
#   run         operator, one-shot: wait for $SITES sites online, run the experiment, check results
#               (the ServerApp keeps its anchor log of the sites' ledger heads in /state/anchors)
#   (anything else is executed as a command)
set -eu
# the SuperExecs (ServerApp at the SuperLink, ClientApps at each site) look for tasks this often
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.25}

CERTS_DIR=${CERTS_DIR:-/certs}
SUPERLINK_ADDRESS=${SUPERLINK_ADDRESS:-superlink:9093}

connection() {
  # the operator's Flower connection: TLS to the SuperLink, verified with the federation's CA
  mkdir -p "$FLWR_HOME"
  cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "fedfm"

[superlink.fedfm]
address = "$SUPERLINK_ADDRESS"
root-certificates = "$CERTS_DIR/ca.crt"
EOF
}

role=${1:-}
[ $# -gt 0 ] && shift
case "$role" in
  superlink)
    # Flower's SuperLink whose ServerApps wait less for the sites' replies (runtime/superlink.py)
    exec python -m runtime.superlink \
      --ssl-ca-certfile "$CERTS_DIR/ca.crt" --ssl-certfile "$CERTS_DIR/superlink.crt" \
      --ssl-keyfile "$CERTS_DIR/superlink.key" --enable-supernode-auth \
      --database /state/state.db --host 0.0.0.0 --port "${SUPERLINK_PORT:-9093}" \
      --disable-runtime-dependency-installation "$@"
    ;;
  supernode)
    : "${SITE_ID:?set SITE_ID (the site's number, as in site-K)}"
    site_key=${SITE_KEY:-/keys/site-$SITE_ID}
    # the key that authenticates the SuperNode also signs every entry of the site's ledger
    node_config="site-id=$SITE_ID ledger-dir=\"/ledger\" signing-key=\"$site_key\""
    [ -n "${SITE_DATA_PATH:-}" ] && node_config="$node_config data-path=\"$SITE_DATA_PATH\""
    [ -n "${SITE_BUDGET_EPSILON:-}" ] && node_config="$node_config budget-epsilon=$SITE_BUDGET_EPSILON"
    # Flower's SuperNode with its 3 s idle wait shortened (runtime/supernode.py)
    exec python -m runtime.supernode --root-certificates "$CERTS_DIR/ca.crt" --superlink "$SUPERLINK_ADDRESS" \
      --auth-supernode-private-key "$site_key" --node-config "$node_config" "$@"
    ;;
  register)
    connection
    for key in "${KEYS_DIR:-/keys}"/site-*.pub; do
      if out=$(flwr supernode register "$key" fedfm 2>&1); then
        echo "registered $(basename "$key" .pub)"
      elif echo "$out" | grep -qi "already"; then
        echo "$(basename "$key" .pub) already registered"
      else
        echo "$out" >&2; exit 1
      fi
    done
    ;;
  run)
    connection
    : "${SITES:?set SITES (how many sites must be online)}"
    waited=0
    until [ "$(flwr supernode list fedfm --format json 2>/dev/null | grep -o '"online"' | wc -l)" -ge "$SITES" ]; do
      waited=$((waited + 2)); [ "$waited" -gt "${WAIT_S:-300}" ] && { echo "fewer than $SITES sites online after ${WAIT_S:-300} s" >&2; exit 1; }
      sleep 2
    done
    out_dir="/runs/${RUN_NAME:-compose}"
    flwr run /app fedfm --stream --run-config \
      "config=\"${EXPERIMENT:-/app/configs/quickstart.yaml}\" overrides=\"${OVERRIDES:-}\" out-dir=\"$out_dir\" anchor-dir=\"${ANCHOR_DIR:-/state/anchors}\""
    # the ServerApp wrote results in the coordinator's /runs volume, mounted here too
    python -c "import json,sys; r=json.load(open('$out_dir/results.json')); print('status', r['status'], 'pooled AUROC', r['pooled'].get('auroc')); sys.exit(r['status'] != 'complete')"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
