"""What every runnable stage (tokenizer/, train/, eval/) does first: read its YAML config."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def read_stage_config(description: str, argv: list[str] | None = None) -> dict:
    """Parse `python STAGE.py CONFIG.yaml` and return the YAML as a dict; create `output_dir` if it names one.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "c.yaml"); _ = open(path, "w").write("num_proc: 2")
    >>> read_stage_config("a stage", [path])
    {'num_proc': 2}
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="YAML file of configs/")
    path = parser.parse_args(argv).config
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"{path}: cannot read the config ({error})")
    if "output_dir" in config:
        Path(config["output_dir"]).mkdir(parents=True, exist_ok=True)
    return config
