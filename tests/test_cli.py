import argparse
import shlex

import pytest

from moefy.cli import add_section_flags, run_step, settings_flags
from moefy.config import STEP_SECTIONS, section_defaults
from moefy.errors import MoefyError


@pytest.mark.parametrize("section", STEP_SECTIONS)
def test_flags_round_trip_through_the_step_parser(section):
    settings = section_defaults(section)
    parser = argparse.ArgumentParser()
    add_section_flags(parser, section)
    assert vars(parser.parse_args(shlex.split(settings_flags(settings)))) == settings


def test_non_default_values_round_trip():
    settings = {**section_defaults("finetune"), "freeze_embeddings": False, "max_train_examples": 500, "precision": "bf16"}
    parser = argparse.ArgumentParser()
    add_section_flags(parser, "finetune")
    assert vars(parser.parse_args(shlex.split(settings_flags(settings)))) == settings
    parser = argparse.ArgumentParser()
    add_section_flags(parser, "evaluate")
    args = parser.parse_args(shlex.split(settings_flags({"budgets": [0.25, 1.0], "batch_size": 8})))
    assert args.budgets == [0.25, 1.0] and args.batch_size == 8


def test_enum_flags_reject_unknown_values():
    parser = argparse.ArgumentParser()
    add_section_flags(parser, "finetune")
    with pytest.raises(SystemExit):
        parser.parse_args(["--activation", "swish"])


def test_user_error_is_one_line_and_exit_2(capsys):
    def main(argv):
        raise MoefyError("config key x: bad")

    with pytest.raises(SystemExit) as exit_info:
        run_step(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "config key x: bad" in err and "Traceback" not in err
