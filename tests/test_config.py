import os

import pytest

from pangu_moe.checks import check
from pangu_moe.config import ConfigError, RunConfig, describe
from tests.conftest import TINY, tiny_config


def test_yaml_round_trip(tmp_path):
    cfg = tiny_config("moe.router=rre", "train.steps=7", "data.domains=[prose, code]")
    path = tmp_path / "c.yaml"
    cfg.save(path)
    again = RunConfig.from_yaml(path)
    assert again == cfg
    assert again.moe.router == "rre" and again.train.steps == 7


def test_defaults_fill_missing_sections():
    cfg = RunConfig.from_dict({"train": {"steps": 50}})
    assert cfg.train.steps == 50 and cfg.model == RunConfig().model


def test_int_is_accepted_for_float_field():
    cfg = tiny_config("train.lr=1")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_exponent_without_a_dot_is_a_number():
    # PyYAML (YAML 1.1) reads 3e-4 as a string; a float field takes it as the number it means
    assert tiny_config("train.lr=3e-4").train.lr == 3e-4
    assert RunConfig.from_dict({"train": {"lr": "2E-3", "min_lr": " 1e-5 "}}).train.min_lr == 1e-5
    with pytest.raises(ConfigError, match="train.lr = '3e-4x': must be a number"):
        tiny_config("train.lr=3e-4x")


def test_nested_override_leaves_the_source_dict_alone():
    cfg = tiny_config("moe.locmoe.locality_coeff=0.5", "parallel.nodes=2")
    assert cfg.moe.locmoe.locality_coeff == 0.5 and cfg.parallel.nodes == 2
    assert "locmoe" not in TINY["moe"] and "parallel" not in TINY


def test_override_parses_yaml_values():
    cfg = tiny_config("moe.topk.normalize_gates=false", "moe.capacity_factor=2")
    assert cfg.moe.topk.normalize_gates is False and cfg.moe.capacity_factor == 2.0


BAD = [
    ({"modle": {}}, "modle: unknown key; allowed: model, moe, parallel, train, data, runtime"),
    ({"model": {"hiden": 3}}, "model.hiden: unknown key; allowed: vocab_size, hidden,"),
    ({"model": {"hidden": "big"}}, "model.hidden = 'big': must be an integer"),
    ({"model": {"hidden": 2.5}}, "model.hidden = 2.5: must be an integer"),
    ({"train": {"lr": -1.0}}, "train.lr = -1.0: must be > 0.0"),
    ({"train": {"beta2": 1.0}}, "train.beta2 = 1.0: must be >= 0.0 and < 1.0"),
    ({"model": {"hidden": 0}}, "model.hidden = 0: must be >= 1"),
    ({"train": {"batch_size": 5}}, "train.batch_size = 5: must be a multiple of the 2 data.domains"),
    ({"moe": {"router": "switchy"}}, "moe.router = 'switchy': must be one of topk, rre, locmoe, locmoe_plus, expert_choice, sinkhorn"),
    ({"moe": {"topk": {"normalize_gates": "yes"}}}, "moe.topk.normalize_gates = 'yes': must be true or false"),
    ({"model": {"hidden": 30, "num_heads": 4}}, "model.num_heads = 4: must be a divisor of model.hidden=30"),
    ({"moe": {"num_experts": 6, "num_groups": 4}}, "moe.num_groups = 4: must be a divisor of moe.num_experts=6"),
    ({"moe": {"num_experts": 6, "num_groups": 3}}, "moe.num_groups = 3: must be 1 or the number of data.domains (2)"),
    ({"moe": {"num_experts": 4, "num_groups": 2, "top_k": 3}}, "moe.top_k = 3: must be at most the experts per group (2)"),
    ({"moe": {"router": "rre", "top_k": 2}}, "moe.top_k = 2: must be at most 1 for router rre"),
    ({"moe": {"locmoe": {"locality_variant": "js"}}}, "moe.locmoe.locality_variant = 'js': must be one of kl, mass"),
    ({"moe": {"locmoe_plus": {"bogus": 1}}}, "moe.locmoe_plus.bogus: unknown key; allowed: locality_coeff,"),
    ({"moe": {"router": "locmoe", "slot_policy": "none", "capacity_mode": "locmoe_bound"}},
     "moe.capacity_mode = 'locmoe_bound': must be factor with moe.slot_policy = none"),
    ({"moe": {"router": "kool_skip"}}, "moe.slot_policy = 'position': must be random for router kool_skip"),
    ({"moe": {"router": "expert_choice", "slot_policy": "probs"}},
     "moe.slot_policy = 'probs': must be position (the default) for router expert_choice"),
    ({"moe": {"slot_policy": "lifo"}}, "moe.slot_policy = 'lifo': must be one of position, probs, random"),
    ({"parallel": {"nodes": 3}}, "parallel.devices_per_node = 1: must be such that nodes x devices_per_node divides"),
    ({"parallel": {"nodes": 2, "devices_per_node": 4}, "train": {"batch_size": 4}},
     "train.batch_size = 4: must be a multiple of nodes x devices_per_node = 8"),
    ({"model": {"hidden": 36, "num_heads": 2}, "moe": {"router": "locmoe", "num_experts": 8}},
     "model.hidden = 36: must be a multiple of the experts per group (8) for router locmoe"),
    ({"data": {"source": "jsonl"}}, "data.path = '': must be a path (data.source=jsonl reads it)"),
    ({"data": {"domains": ["a", "a"], "source": "jsonl", "path": "x"}}, "data.domains = ['a', 'a']: must be a non-empty list of distinct names"),
    ({"data": {"domains": "prose"}}, "data.domains = 'prose': must be a list of str"),
    ({"train": {"steps": 10, "warmup_steps": 11}}, "train.warmup_steps = 11: must be <= train.steps=10"),
    ({"train": {"lr": float("nan")}}, "train.lr = nan: must be a finite number"),
    ({"parallel": {"dispatch": "alltoall"}}, "parallel.dispatch = 'alltoall': must be one of local"),
    ({"model": 5}, "model = 5: must be a mapping"),
    ([1, 2], "config: the top level must be a mapping, got list"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_names_path_value_and_allowed(raw, message):
    with pytest.raises(ConfigError) as err:
        check(RunConfig.from_dict(raw))  # the config's own rules, then the routers' (pangu_moe/checks.py)
    text = str(err.value)
    assert text.startswith(message)
    assert "\n" not in text


@pytest.mark.parametrize("item, message", [
    ("train.steps", "--set 'train.steps': must look like section.key=value"),
    ("steps=3", "--set 'steps': must be a dotted path section.key"),
    ("train.stepz=3", "train.stepz: unknown key"),
])
def test_bad_override(item, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        RunConfig.from_dict(TINY, [item])


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")


def test_every_field_has_help():
    fields = list(describe())
    assert len(fields) > 40
    assert all(text for _, _, text in fields)


def test_every_shipped_config_validates_and_keeps_the_pangu_shape():
    """configs/*.yaml: a dense bottom, a MoE top; the demo and smoke configs: two domains with one expert group each;
    the own-corpus config: one group whatever the domains, sampled by their bytes (no tie to the domain count)."""
    import glob
    from pangu_moe.configs import DEMO_CONFIG
    paths = sorted(glob.glob(os.path.join(os.path.dirname(DEMO_CONFIG), "*.yaml")))
    assert [os.path.basename(p) for p in paths] == ["corpus_cpu.yaml", "demo_cpu.yaml", "smoke_cpu.yaml"]
    for path in paths:
        cfg = RunConfig.from_yaml(path)
        assert cfg.model.num_dense_layers >= 1 and cfg.model.num_moe_layers >= 1, path
        if "corpus" in path:
            assert (cfg.moe.num_groups, cfg.data.mixture, cfg.data.source) == (1, "bytes", "prepared")
        else:
            assert len(cfg.data.domains) == cfg.moe.num_groups == 2, path


def test_a_shipped_config_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("smoke_cpu", "smoke_cpu.yaml", "configs/smoke_cpu.yaml"):
        assert RunConfig.from_yaml(name).train.steps == 300
    with pytest.raises(ConfigError, match=r"config file nope.yaml: not found \(shipped configs, usable by name: "
                                          r"corpus_cpu, demo_cpu, smoke_cpu\)"):
        RunConfig.from_yaml("nope.yaml")
    (tmp_path / "smoke_cpu.yaml").write_text("train:\n  steps: 7\n  warmup_steps: 1\n")
    assert RunConfig.from_yaml("smoke_cpu.yaml").train.steps == 7  # a file of that name wins
