"""federation.ray_address reaches Flower's Ray backend as RAY_ADDRESS, without local resource settings.

An end-to-end test against a Ray head started by the test is not here yet: it was not reliable
(the simulation did not always land on the test's cluster), see the README.
"""

import os

from fedfm.config import load_config
from fedfm.simulate import federation_config, simulation_env


def test_ray_address_reaches_flower_and_drops_local_resources():
    config = load_config(None, ["federation.ray_address=10.1.2.3:6379"])
    assert simulation_env(config)["RAY_ADDRESS"] == "10.1.2.3:6379"
    assert "init-args-num-cpus" not in federation_config(config)  # a cluster brings its own resources
    local = load_config(None, [])
    assert simulation_env(local).get("RAY_ADDRESS") == os.environ.get("RAY_ADDRESS")  # untouched
    assert "init-args-num-cpus" in federation_config(local)
