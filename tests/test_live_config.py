"""What changes while serving (app/config/live.py): checked as a whole against the gateway config."""

import pytest

from app.config import ConfigError, ServeConfigFile, parse_gateway_config
from app.config.live import LiveConfig, applied, digest, live_state_of, merged


def gateway(**engine):
    return parse_gateway_config({
        "models": [{"name": "base", "engine": engine or {}, "adapters": [{"name": "a"}]},
                   {"name": "other"}],
        "traffic": {"prod": {"targets": [{"target": "base", "weight": 9}, {"target": "a", "weight": 1}]}},
    })


def test_a_change_replaces_only_the_sections_it_gives():
    config = gateway()
    change = LiveConfig.model_validate({"adapters": {"base": [{"name": "a"}, {"name": "b"}]}})
    state = merged(live_state_of(config), change)
    assert state.adapters == {"base": {"a": "sim://a", "b": "sim://b"}, "other": {}}
    assert state.traffic == config.traffic
    assert applied(config, state).models[0].adapter_paths == {"a": "sim://a", "b": "sim://b"}


def test_removing_an_adapter_a_split_targets_is_refused_naming_both():
    config = gateway()
    state = merged(live_state_of(config), LiveConfig.model_validate({"adapters": {"base": []}}))
    with pytest.raises(ConfigError, match="traffic split 'prod': unknown target 'a'"):
        applied(config, state)


def test_adapters_for_an_unknown_model_or_a_vllm_without_lora_are_refused(tmp_path):
    config = gateway()
    with pytest.raises(ConfigError, match="no model named 'nope'"):
        applied(config, merged(live_state_of(config), LiveConfig.model_validate({"adapters": {"nope": []}})))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    vllm = parse_gateway_config({"models": [{"name": "v", "engine": {"kind": "vllm", "model": str(tmp_path)}}]})
    change = LiveConfig.model_validate({"adapters": {"v": [{"name": "x", "source": str(tmp_path)}]}})
    with pytest.raises(ConfigError, match="enable_lora"):
        applied(vllm, merged(live_state_of(vllm), change))


def test_the_same_user_config_has_the_same_digest():
    assert digest({"traffic": {}, "adapters": {"b": []}}) == digest({"adapters": {"b": []}, "traffic": {}})
    assert digest({"traffic": {}}) != digest({"traffic": None})


def test_a_serve_file_with_a_bad_ingress_user_config_is_refused_at_check_time():
    app = {"args": {"models": [{"name": "base"}]},
           "deployments": [{"name": "ingress", "user_config": {"traffic": {"p": {"targets": [{"target": "zz",
                                                                                            "weight": 1}]}}}}]}
    with pytest.raises(ValueError, match=r"(?s)deployments.ingress.user_config.*unknown target 'zz'"):
        ServeConfigFile.model_validate({"proxy_location": "Disabled", "applications": [app]})
    app["deployments"][0]["user_config"] = {"adapters": {"base": [{"name": "new"}]}}
    ServeConfigFile.model_validate({"proxy_location": "Disabled", "applications": [app]})


def test_an_adapter_folder_that_does_not_exist_is_refused_naming_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    vllm = parse_gateway_config({"models": [{"name": "v", "engine": {"kind": "vllm", "model": str(tmp_path),
                                                                      "enable_lora": True}}]})
    change = LiveConfig.model_validate({"adapters": {"v": [{"name": "x", "source": str(tmp_path / "nope")}]}})
    with pytest.raises(ConfigError, match=r"adapter 'x': no adapter_config.json in .*nope"):
        applied(vllm, merged(live_state_of(vllm), change))
    (tmp_path / "nope").mkdir()
    (tmp_path / "nope" / "adapter_config.json").write_text("{}")
    assert applied(vllm, merged(live_state_of(vllm), change)).models[0].adapter_paths == {"x": str(tmp_path / "nope")}


def test_an_adapter_listed_twice_or_a_policy_that_cannot_follow_new_adapters_is_refused():
    config = gateway()
    with pytest.raises(ConfigError, match="'b' is listed twice"):
        merged(live_state_of(config), LiveConfig.model_validate({"adapters": {"base": [{"name": "b"}, {"name": "b"}]}}))
    unranked = parse_gateway_config({"models": [{"name": "base"}], "routing": {"policy": "power_of_two"}})
    change = LiveConfig.model_validate({"adapters": {"base": [{"name": "new"}]}})
    with pytest.raises(ConfigError, match="power_of_two picks replicas inside Serve's handle"):
        applied(unranked, merged(live_state_of(unranked), change))
