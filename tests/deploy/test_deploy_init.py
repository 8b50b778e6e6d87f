"""`fedfm deploy init`: a CA, a SuperLink certificate that verifies, site keys Flower accepts."""

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from fedfm.cli import main
from fedfm.deploy.init import init_deployment
from fedfm.deploy.pki import certificate_names


def test_init_writes_a_verifiable_certificate_and_one_key_pair_per_site(tmp_path):
    dep = init_deployment(tmp_path / "dep", sites=3, names=["coordinator.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(dep.ca.read_bytes())
    server = x509.load_pem_x509_certificate(dep.server_cert.read_bytes())
    # the server certificate is signed by the CA (TLS verification at every site depends on it)
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, padding.PKCS1v15(),
                           server.signature_hash_algorithm)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    names = certificate_names(dep.server_cert)
    assert {"coordinator.example.org", "10.0.0.5", "superlink", "localhost", "127.0.0.1", "::1"} <= set(names)
    assert dep.sites == [0, 1, 2]
    for site in dep.sites:
        private = serialization.load_ssh_private_key(dep.private_key(site).read_bytes(), password=None)
        public = serialization.load_ssh_public_key(dep.public_key(site).read_bytes())
        assert isinstance(private.curve, ec.SECP384R1)  # what Flower's node authentication expects
        assert private.public_key().public_numbers() == public.public_numbers()
        assert stat.S_IMODE(dep.private_key(site).stat().st_mode) == 0o600
        assert f"SITE_ID={site}" in (dep.root / "sites" / f"site-{site}.env").read_text()
    assert stat.S_IMODE((dep.root / "certs" / "ca.key").stat().st_mode) == 0o600
    assert 'address = "coordinator.example.org:9093"' in (dep.flwr_home / "config.toml").read_text()
    steps = (dep.root / "STEPS.md").read_text()
    assert "flwr supernode register" in steps and "--enable-supernode-auth" in steps


def test_init_refuses_to_overwrite_existing_keys(tmp_path, capsys):
    assert main(["deploy", "init", "--sites", "2", "--out", str(tmp_path / "dep")]) == 0
    key = (tmp_path / "dep" / "keys" / "site-0").read_bytes()
    assert main(["deploy", "init", "--sites", "2", "--out", str(tmp_path / "dep")]) == 2
    assert "already holds a deployment" in capsys.readouterr().err
    assert (tmp_path / "dep" / "keys" / "site-0").read_bytes() == key


def test_init_needs_a_site(tmp_path):
    with pytest.raises(ValueError, match="at least one site"):
        init_deployment(tmp_path / "dep", sites=0)


def test_sites_make_their_own_keys_and_the_coordinator_gets_only_public_ones(tmp_path, capsys):
    from fedfm.privacy.signing import EntrySigner, load_public_key, public_key_id

    for site in (0, 1):  # at each hospital
        assert main(["deploy", "keygen", "--site", str(site), "--out", str(tmp_path / f"hospital-{site}")]) == 0
    assert "send site-1.pub to the coordinator" in capsys.readouterr().out
    private = tmp_path / "hospital-0" / "site-0"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert main(["deploy", "keygen", "--site", "0", "--out", str(tmp_path / "hospital-0")]) != 0
    assert "already has a key pair" in capsys.readouterr().err
    received = tmp_path / "received"
    received.mkdir()
    for site in (0, 1):
        (received / f"site-{site}.pub").write_bytes((tmp_path / f"hospital-{site}" / f"site-{site}.pub").read_bytes())
    assert main(["deploy", "init", "--sites", "2", "--out", str(tmp_path / "dep"), "--site-keys", str(received)]) == 0
    keys = sorted(p.name for p in (tmp_path / "dep" / "keys").iterdir())
    assert keys == ["site-0.pub", "site-1.pub"]  # no private key at the coordinator
    assert public_key_id(load_public_key(tmp_path / "dep" / "keys" / "site-0.pub")) == EntrySigner.from_file(private).key_id
    steps = (tmp_path / "dep" / "STEPS.md").read_text()
    assert "each hospital made its own key pair" in steps and 'signing-key="site-K"' in steps
    all_in_one = init_deployment(tmp_path / "demo", sites=1)
    assert "Fine for `fedfm deploy\nlocal` and demos" in (all_in_one.root / "STEPS.md").read_text()


def test_init_with_site_keys_names_the_missing_public_key(tmp_path):
    from fedfm.config import ConfigError

    (tmp_path / "received").mkdir()
    with pytest.raises(ConfigError, match="site-0.pub; each hospital runs `fedfm deploy keygen --site 0`"):
        init_deployment(tmp_path / "dep", sites=2, site_keys=tmp_path / "received")
    (tmp_path / "received" / "site-0.pub").write_text("not a key\n")
    with pytest.raises(ConfigError, match="not an OpenSSH public key"):
        init_deployment(tmp_path / "dep", sites=1, site_keys=tmp_path / "received")
    assert not (tmp_path / "dep").exists()  # nothing written before the keys check out
