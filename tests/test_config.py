"""Every shipped config validates; mistakes are rejected with the path of the bad key."""

from pathlib import Path

import pytest
import yaml

from app.config import ConfigError, ServeConfigFile, load_serve_config, main, parse_gateway_config
from app.deployments.builder import build_app

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_serve_config(path)
    for application in config.applications:
        assert application.args.models


def test_local_config_is_the_laptop_default():
    config = load_serve_config("configs/local.yaml")
    assert config.http_options.host == "127.0.0.1"
    model = config.applications[0].args.models[0]
    assert model.engine.kind == "simulated"
    assert model.deployment.ray_actor_options == {"num_cpus": 0}
    # The default path: the ingress replicas' own listener on this machine's port 8000, no proxy.
    listen = config.applications[0].args.ingress.listen
    assert (listen.host, listen.port, config.proxy_location) == ("127.0.0.1", 8000, "Disabled")


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda c: c.update(extra_top=1), "extra_top"),
        (lambda c: c["http_options"].update(hots="x"), "http_options.hots"),
        (lambda c: c["applications"][0].update(argz={}), "applications.0.argz"),
        (lambda c: c["applications"][0]["args"].update(modelz=[]), "applications.0.args.modelz"),
        (lambda c: c["applications"][0]["args"]["models"][0]["engine"].update(blok_size=3),
         "applications.0.args.models.0.engine.blok_size"),
        (lambda c: c["applications"][0]["args"]["models"][0]["deployment"].update(replicas=3),
         "applications.0.args.models.0.deployment.replicas"),
        (lambda c: c["applications"][0].update(deployments=[{"name": "ingress", "num_replicaz": 2}]),
         "applications.0.deployments.0.num_replicaz"),
    ],
)
def test_unknown_keys_are_rejected_with_their_path(tmp_path, mutate, where):
    data = yaml.safe_load(Path("configs/local.yaml").read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as raised:
        load_serve_config(path)
    assert f"{where}: unknown key" in str(raised.value)


def test_bad_values_and_duplicate_names_are_rejected():
    with pytest.raises(ConfigError, match="block_size"):
        parse_gateway_config({"models": [{"name": "m", "engine": {"block_size": 0}}]})
    with pytest.raises(ConfigError, match="used twice"):
        parse_gateway_config({"models": [{"name": "m"}, {"name": "n", "aliases": ["m"]}]})
    with pytest.raises(ConfigError, match="models"):
        parse_gateway_config({"models": []})


def test_invalid_autoscaling_is_caught_before_deploying(tmp_path):
    data = yaml.safe_load(Path("configs/local.yaml").read_text())
    data["applications"][0]["deployments"] = [
        {"name": "engine-sim-llama", "autoscaling_config": {"min_replicas": 5, "max_replicas": 1}}
    ]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="autoscaling_config"):
        load_serve_config(path)


def test_builder_rejects_bad_args_with_a_clear_message():
    with pytest.raises(ConfigError, match=r"models\.0\.engine\.bogus: unknown key"):
        build_app({"models": [{"name": "m", "engine": {"bogus": 1}}]})


def test_check_command(capsys):
    assert main(["check", "configs/local.yaml"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main([]) == 2


def test_the_listener_and_serves_proxy_cannot_share_a_port():
    data = yaml.safe_load(Path("configs/local.yaml").read_text())
    data["proxy_location"] = "EveryNode"
    assert ServeConfigFile.model_validate(data).http_options.port == 8001  # the proxy beside the listener
    data["http_options"]["port"] = 8000  # the listener's
    with pytest.raises(ValueError, match="proxy_location: Disabled"):
        ServeConfigFile.model_validate(data)
    data["applications"][0]["args"]["ingress"]["listen"] = None  # only the proxy (and handles) then
    assert ServeConfigFile.model_validate(data).applications[0].args.ingress.listen is None


def test_two_applications_need_two_listener_ports():
    data = yaml.safe_load(Path("configs/local.yaml").read_text())
    second = {**data["applications"][0], "name": "second", "route_prefix": "/second"}
    data["applications"].append(second)
    with pytest.raises(ValueError, match="both listen on port 8000"):
        ServeConfigFile.model_validate(data)


def _external(**engine) -> dict:
    return {"models": [{"name": "m", "tokenizer": "app/assets/tiny-tokenizer",
                        "engine": {"kind": "external", **engine}}]}


def test_external_servers_config():
    config = load_serve_config("configs/external.yaml")
    model = config.applications[0].args.models[0]
    assert model.is_external and [e.url for e in model.engine.endpoints] == ["http://127.0.0.1:8101",
                                                                              "http://127.0.0.1:8102"]
    assert model.engine.endpoints[0].kv_events == "tcp://127.0.0.1:5557"
    assert model.tokenizer.is_absolute()  # replicas may start elsewhere
    # Plain URLs are accepted, trailing slash or /v1 dropped.
    parsed = parse_gateway_config(_external(endpoints=["http://a:8000/", "http://b:8000/v1"]))
    assert [e.url for e in parsed.models[0].engine.endpoints] == ["http://a:8000", "http://b:8000"]
    discovered = parse_gateway_config(_external(kubernetes={"namespace": "llm", "label_selector": "app=vllm"}))
    assert discovered.models[0].engine.kubernetes.port == 8000
    # Without a tokenizer the servers tokenize: no built-in tokenizer is put in their place.
    untokenized = parse_gateway_config({"models": [{"name": "m", "engine": {"kind": "external",
                                                                             "endpoints": ["http://a:8000"]}}]})
    assert untokenized.models[0].tokenizer_dir is None
    assert untokenized.models[0].engine.chars_per_token == 4.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (_external(), "either `endpoints`"),
        (_external(endpoints=["http://a:8000"], kubernetes={"label_selector": "app=vllm"}), "exactly one"),
        (_external(endpoints=["a:8000"]), "scheme and host"),
        (_external(endpoints=["http://a:8000/v1/completions"]), "without a path"),
        (_external(endpoints=["http://a:8000", "http://a:8000/"]), "listed twice"),
        (_external(endpoints=[{"url": "http://a:8000", "kv_events": "a:5557"}]), "ZMQ endpoint"),
        (_external(endpoints=["http://a:8000"]) | {"routing": {"policy": "ray_prefix_cache_affinity"}},
         "use prefix_aware"),
        (_external(endpoints=["http://a:8000"], chars_per_token=0), "chars_per_token"),
        (_external(kubernetes={"label_selector": "app=vllm", "kubeconfig": "/nonexistent"}), "no kubeconfig file"),
        (_external(kubernetes={"label_selector": "app=vllm", "kubeconfig": "pyproject.toml", "in_cluster": True}),
         "service account"),
        ({"models": [{"name": "m", "tokenizer": "app/assets/tiny-tokenizer", "deployment": {"num_replicas": 1},
                      "engine": {"kind": "external", "endpoints": ["http://a:8000"]}}]}, "remove `deployment`"),
    ],
)
def test_external_servers_config_mistakes(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_gateway_config(args)
