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
    assert study["finetune"]["max_length"] == 64
    assert study["selector"]["mlp_patience"] == section_defaults("selector")["mlp_patience"]
    assert study["compute"]["threads"]["finetune"] >= 1
    assert study["mlflow"]["tracking_uri"] is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: c["grid"].update(split=["kmean"]), "grid.split.0"),
        (lambda c: c["grid"].update(selector=["oracle"]), "'oracle' is not allowed"),
        (lambda c: c["evaluate"].__setitem__("budgets", [0.0, 0.5]), "evaluate.budgets.0"),
        (lambda c: c["evaluate"].__setitem__("budgets", [1.5]), "evaluate.budgets.0"),
        (lambda c: c["grid"].update(num_experts=[0]), "grid.num_experts.0"),
        (lambda c: c["finetune"].__setitem__("epochs", -1), "finetune.epochs"),
        (lambda c: c["finetune"].__setitem__("epoch", 3), "allowed keys"),
        (lambda c: c["dataset"].__setitem__("hub", {"name": "rotten_tomatoes"}), "exactly one of `path`"),
        (lambda c: c.pop("model"), "'model' is a required property"),
        (lambda c: c.__setitem__("study", "my study"), "config key study"),
    ],
)
def test_bad_config_names_the_key(study, change, fragment):
    bad = copy.deepcopy(study)
    change(bad)
    with pytest.raises(MoefyError) as err:
        validate(bad)
    assert fragment in str(err.value)


def test_every_key_is_documented():
    keys = list(iter_keys())
    assert ("finetune.activation", "relu") == keys[[k for k, *_ in keys].index("finetune.activation")][:2]
    undocumented = [key for key, _, description in keys if not description]
    assert undocumented == []


def test_readme_config_table_matches_schema():
    """The README's config table is generated from the schema (scripts/config_table.py); regenerate it if this fails."""
    from moefy.config import markdown_table

    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme
