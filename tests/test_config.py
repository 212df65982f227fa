"""Configs: constructor arguments <-> JSON with the reference's fields and from_config rules."""

from __future__ import annotations

import json
import logging

import pytest

from diffpipe.config import ConfigMixin
from diffpipe.errors import ConfigError, UnsafePathError


class Sched(ConfigMixin):
    config_name = "scheduler_config.json"

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear", trained_betas=None):
        self.n = num_train_timesteps


class Other(ConfigMixin):
    config_name = "scheduler_config.json"

    def __init__(self, num_train_timesteps: int = 1000, use_karras_sigmas: bool = False):
        pass


class Child(Sched):
    def __init__(self, num_train_timesteps: int = 10, extra: float = 0.5):
        super().__init__(num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear")


def test_constructor_arguments_become_the_config_and_defaults_are_noted():
    s = Sched(beta_schedule="scaled_linear")
    assert s.config.beta_schedule == "scaled_linear"
    assert s.config["num_train_timesteps"] == 1000
    assert set(s.config["_use_default_values"]) == {"num_train_timesteps", "trained_betas"}
    positional = Sched(500)
    assert positional.config.num_train_timesteps == 500


def test_only_the_most_derived_init_records():
    c = Child(num_train_timesteps=7)
    assert dict(c.config) == {"num_train_timesteps": 7, "extra": 0.5, "_use_default_values": ["extra"]}


def test_config_is_read_only():
    s = Sched()
    with pytest.raises(TypeError, match="read-only"):
        s.config["beta_schedule"] = "x"
    with pytest.raises(TypeError, match="read-only"):
        s.config.beta_schedule = "x"
    with pytest.raises(AttributeError, match="no key 'nope'"):
        s.config.nope


def test_json_has_the_reference_fields_sorted():
    data = json.loads(Sched(num_train_timesteps=10).to_json_string())
    assert data["_class_name"] == "Sched"
    assert data["_diffusers_version"] and not [k for k in data if k.startswith("_diffpipe")]
    assert "_use_default_values" not in data
    assert list(data) == sorted(data)


def test_from_config_with_overrides_and_defaults_of_the_source_dropped():
    source = Sched(num_train_timesteps=500)
    other = Other.from_config(source.config, use_karras_sigmas=True)
    assert other.config.num_train_timesteps == 500 and other.config.use_karras_sigmas is True
    # beta_schedule was only a default of Sched, so it is not carried over as an unknown key
    assert "beta_schedule" not in other.config
    explicit = Sched(beta_schedule="squaredcos_cap_v2")
    other2 = Other.from_config(explicit.config)
    assert other2.config.beta_schedule == "squaredcos_cap_v2"  # kept for a later compatible class
    back = Sched.from_config(other2.config)
    assert back.config.beta_schedule == "squaredcos_cap_v2"


def test_unknown_config_keys_are_kept_and_reported_each_time(caplog):
    caplog.set_level(logging.WARNING)
    config = {"num_train_timesteps": 3, "mystery_key": 1, "_class_name": "Sched"}
    a = Sched.from_config(config)
    Sched.from_config(config)
    assert a.config.mystery_key == 1
    assert caplog.text.count("The config attributes {'mystery_key': 1} were passed to Sched") == 2


def test_an_override_the_class_does_not_take_is_ignored_with_a_warning(caplog):
    caplog.set_level(logging.WARNING)
    obj, unused = Sched.from_config({}, beta_schedul="linear", return_unused_kwargs=True)
    assert "beta_schedul" not in obj.config and unused == {"beta_schedul": "linear"}
    assert "were passed to Sched, but are not expected and will be ignored" in caplog.text
    assert "beta_schedul" in caplog.text


def test_save_and_load_config_round_trip(tmp_path):
    s = Sched(num_train_timesteps=42, beta_schedule="scaled_linear")
    path = s.save_config(tmp_path / "scheduler")
    assert path.name == "scheduler_config.json"
    loaded = Sched.from_config(Sched.load_config(tmp_path, subfolder="scheduler"))
    assert loaded.config.num_train_timesteps == 42 and loaded.config.beta_schedule == "scaled_linear"
    assert not [p for p in (tmp_path / "scheduler").iterdir() if p.name != "scheduler_config.json"]


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected an object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "cannot be read"),
        (b'{"a": ' + b"9" * 5000 + b"}", "cannot be read"),
    ],
)
def test_bad_config_files_name_the_file(tmp_path, content, match):
    (tmp_path / "scheduler_config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=match) as err:
        Sched.load_config(tmp_path)
    assert str(tmp_path / "scheduler_config.json") in str(err.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no scheduler_config.json"):
        Sched.load_config(tmp_path, subfolder=None)


@pytest.mark.parametrize("subfolder", ["../outside", "/etc", "a/../../b", "a\\b"])
def test_subfolder_must_stay_inside(tmp_path, subfolder):
    with pytest.raises(UnsafePathError):
        Sched.load_config(tmp_path, subfolder=subfolder)
