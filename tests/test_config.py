import copy
from pathlib import Path

import pytest
import yaml

from moefy.config import iter_keys, section_defaults, validate
from moefy.errors import MoefyError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def study() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_study_is_valid_and_gets_defaults(study):
    validate(study)
    assert study["grid"]["moefication"]["seed"] == [0] and study["grid"]["moefication"]["penalty"] == ["none"]
    assert study["dataset"]["seed"] == 0
    assert study["finetune"]["max_length"] == 64
    assert study["router"]["mlp_patience"] == section_defaults("router")["mlp_patience"]
    assert study["compute"]["threads"]["finetune"] >= 1
    assert study["mlflow"]["tracking_uri"] is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: c["grid"]["moefication"].update(split=["kmean"]), "grid.moefication.split.0"),
        (lambda c: c["grid"]["moefication"].update(router=["oracle"]), "'oracle' is not allowed"),
        (lambda c: c["grid"]["d2dmoe"].update(penalty=["hoyr"]), "grid.d2dmoe.penalty.0: 'hoyr' is not allowed"),
        (lambda c: c["grid"]["d2dmoe"].update(thresholds=[1.5]), "grid.d2dmoe.thresholds.0"),
        (lambda c: c["grid"]["d2dmoe"].update(seed=[-1]), "grid.d2dmoe.seed.0"),
        (lambda c: c["grid"]["d2dmoe"].pop("split"), "'split' is a required property"),
        (lambda c: c.__setitem__("grid", {}), "config key grid: name at least one arm"),
        (lambda c: c["grid"].__setitem__("bad arm", c["grid"]["d2dmoe"]), "config key grid: 'bad arm' does not match"),
        (lambda c: c["evaluate"].__setitem__("budgets", [0.0, 0.5]), "evaluate.budgets.0"),
        (lambda c: c["evaluate"].__setitem__("budgets", [1.5]), "evaluate.budgets.0"),
        (lambda c: c["grid"]["moefication"].update(num_experts=[0]), "grid.moefication.num_experts.0"),
        (lambda c: c["finetune"].__setitem__("epochs", -1), "finetune.epochs"),
        (lambda c: c["finetune"].__setitem__("epoch", 3), "allowed keys"),
        (lambda c: c["dataset"].__setitem__("hub", {"name": "rotten_tomatoes"}), "exactly one of `path`"),
        (lambda c: c.pop("model"), "'model' is a required property"),
        (lambda c: c.__setitem__("study", "my study"), "config key study"),
        (lambda c: c["grid"]["d2dmoe"].update(convert=["attention"]), "grid.d2dmoe.convert.0: 'attention' is not allowed"),
        (lambda c: c.__setitem__("compute", {"rdzv_endpoint": "node7"}), "compute.rdzv_endpoint"),
        (lambda c: c.__setitem__("compute", {"nnodes": 0}), "compute.nnodes"),
    ],
)
def test_bad_config_names_the_key(study, change, fragment):
    bad = copy.deepcopy(study)
    change(bad)
    with pytest.raises(MoefyError) as err:
        validate(bad)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("change", "old", "new"),
    [
        (
            lambda c: c["grid"]["moefication"].__setitem__("selector", c["grid"]["moefication"].pop("router")),
            "grid.moefication.selector",
            "grid.<arm>.router",
        ),
        (lambda c: c.__setitem__("selector", {"mlp_epochs": 5}), "selector", "router"),
        (lambda c: c.__setitem__("compute", {"threads": {"selector": 2}}), "compute.threads.selector", "compute.threads.router"),
        (lambda c: c.__setitem__("distill", {"max_epochs": 5}), "distill", "distill_attention"),
        (
            lambda c: c.__setitem__("compute", {"threads": {"distill": 2}}),
            "compute.threads.distill",
            "compute.threads.distill_attention",
        ),
        (
            lambda c: c.__setitem__("cluster", {"rules": {"distil_merged": {"runtime": 5}}}),
            "cluster.rules.distil_merged",
            "cluster.rules.distill_merged",
        ),
        (lambda c: c.__setitem__("train_moe", {"balance_weight": 0.1}), "train_moe.balance_weight", "train_moe.load_loss_weight"),
    ],
)
def test_a_renamed_key_is_refused_with_its_new_name(study, change, old, new):
    """An old config must not silently mean something else: a renamed step section would be filled
    with defaults and its settings ignored."""
    bad = copy.deepcopy(study)
    change(bad)
    with pytest.raises(MoefyError) as err:
        validate(bad)
    assert f"config key {old} was renamed: write {new}" in str(err.value)


@pytest.mark.parametrize(
    ("models", "merging", "fragment"),
    [
        (
            {"top2": {}, "top3": {"k": 3, "experts": 2}},
            {},
            "config key upcycling.models.top3.k: 3 experts per token, but the model has 2 (upcycling.models.top3.experts); "
            "use k of at most 2, or more experts",
        ),
        ({"moe": {"routing": "unweighted_top_k", "k": 9}}, {}, "upcycling.models.moe.k: 9 experts per token"),
        (
            {"small": {"experts": 4}, "big": {}},
            {"models": ["small", "big"], "groups": [8, 6, 2.5]},
            "config key merging.groups: 8, 6 groups per layer, more than the 4 experts of upcycling.models.small, which "
            "merging.models merges; use groups of at most 4",
        ),
    ],
)
def test_settings_that_cannot_hold_together_are_refused(study, models, merging, fragment):
    bad = copy.deepcopy(study) | {"upcycling": {"models": models}, "merging": merging}
    with pytest.raises(MoefyError) as err:
        validate(bad)
    assert fragment in str(err.value) and str(err.value).count("config key") == 1


def test_settings_that_hold_together_pass(study):
    models = {"all": {"k": 8}, "ec": {"routing": "expert_choice", "experts": 2, "k": 3}, "unmerged": {"experts": 2}}
    validate(copy.deepcopy(study) | {"upcycling": {"models": models}, "merging": {"models": ["all"], "groups": [8, 1]}})


def test_the_upcycle_section_is_every_upcycled_model_s_defaults(study):
    """A key set in `upcycle` reaches every model that does not set it itself; the schema's defaults
    fill only what neither sets, and validating twice changes nothing."""
    models = {"plain": {}, "wide": {"experts": 16, "k": 4}}
    config = copy.deepcopy(study) | {"upcycle": {"experts": 4, "drop_ratio": 0.5}, "upcycling": {"models": models}}
    validate(config)
    plain, wide = config["upcycling"]["models"]["plain"], config["upcycling"]["models"]["wide"]
    assert (plain["experts"], plain["drop_ratio"], plain["k"]) == (4, 0.5, 2)
    assert (wide["experts"], wide["drop_ratio"], wide["k"]) == (16, 0.5, 4)
    assert validate(copy.deepcopy(config)) == config


def test_every_renamed_key_names_a_key_of_the_schema():
    from moefy.config import RENAMED, schema

    rules = schema()["properties"]["cluster"]["properties"]["rules"]["propertyNames"]["enum"]
    documented = {key for key, *_ in iter_keys()} | {f"cluster.rules.{rule}" for rule in rules}
    assert set(RENAMED.values()) <= documented
    assert not {".".join(old) for old in RENAMED} & documented, "an old name must not be a key again"


def test_every_key_is_documented():
    keys = list(iter_keys())
    assert ("finetune.activation", "relu") == keys[[k for k, *_ in keys].index("finetune.activation")][:2]
    undocumented = [key for key, _, description in keys if not description]
    assert undocumented == []


def test_every_arm_key_is_documented():
    keys = [key for key, *_ in iter_keys()]
    assert {"grid.<arm>.penalty", "grid.<arm>.seed", "grid.<arm>.split", "grid.<arm>.thresholds"} <= set(keys)


def test_configuration_doc_matches_schema():
    """docs/configuration.md holds the table generated from the schema: `python -m moefy.config` prints it."""
    from moefy.config import markdown_table

    assert markdown_table() in (ROOT / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")) + [ROOT / "config.yaml"], ids=lambda p: p.name)
def test_every_shipped_study_is_valid(path):
    validate(yaml.safe_load(path.read_text()))


# Overlays add an ablation to a study (`--configfile <study> <overlay>`), each to the study it names.
OVERLAYS = {"merging-ranks.yaml": "config.yaml", "merging-ranks-smollm2.yaml": "config/smollm2.yaml"}


def test_every_overlay_is_valid_on_its_study():
    from snakemake.utils import update_config

    assert sorted(p.name for p in (ROOT / "config" / "overlays").glob("*.yaml")) == sorted(OVERLAYS)
    for overlay, study in OVERLAYS.items():
        config = yaml.safe_load((ROOT / study).read_text())
        update_config(config, yaml.safe_load((ROOT / "config" / "overlays" / overlay).read_text()))  # as --configfile does
        validate(config)
        assert f"--configfile {study} config/overlays/{overlay}" in (ROOT / "config" / "overlays" / overlay).read_text()


def test_the_vocabulary_is_the_schema_s():
    from moefy import config
    from moefy.adapters import tasks
    from moefy.conversion import routers
    from moefy.training import sparsity

    assert (
        config.ROUTERS == ("groundtruth", "similarity", "mlp", "linear", "norm", "representative")
        and routers.ROUTERS is config.ROUTERS
    )
    assert config.PENALTIES == ("none", "l1", "hoyer") and sparsity.PENALTIES is config.PENALTIES
    assert set(tasks._TASKS) == set(config.TASKS) and config.SPLITS == ("random", "kmeans", "coact")


def test_the_default_study_trains_in_fp32_on_every_cpu(study):
    """docs/results.md promises the default study's dense model does not depend on bf16 support."""
    assert validate(study)["finetune"]["precision"] == "fp32"
    assert {arm["split"][0] for arm in study["grid"].values()} <= {"random", "kmeans", "coact"}
    assert set(study["grid"]) == {"moefication", "d2dmoe"} and study["grid"]["d2dmoe"]["router"] == ["norm"]


def test_the_seeds_study_is_the_default_study_with_three_seeds(study):
    """The README quotes config/seeds.yaml as the default study's methods over three seeds: nothing
    else may differ (its seed 0 is then the default study)."""
    seeds = yaml.safe_load((ROOT / "config" / "seeds.yaml").read_text())
    assert seeds.pop("study") == study.pop("study") + "-seeds"
    for arm in seeds["grid"].values():
        assert arm.pop("seed") == [0, 1, 2]
    assert seeds == study
