"""Stage: what loading and switching property adapters costs, against reloading the base model
(crystallm/adapters.py), median of `repeats` runs.

    python eval/adapter_switching.py configs/experiments/eval-adapter-switching.yaml

Writes `<output_dir>/switching.json`: seconds to load the base model, to add the first and the second adapter,
to switch between them with `set_adapter`, and each adapter's size on disk.
"""

import json
import statistics
import time
from pathlib import Path

from crystallm.adapters import ADAPTERS_FOLDER, use_adapter
from crystallm.generation.sampling import load_generator
from crystallm.model_folder import resolve_model_folder
from crystallm.stage_config import read_stage_config


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def main() -> None:
    config = read_stage_config(__doc__)
    first, second = config["adapters"]
    runs = []
    for _ in range(int(config.get("repeats", 5))):
        (model, _), load_base = timed(lambda: load_generator(config.get("model")))
        model, load_first = timed(lambda: use_adapter(model, first))
        base = model.get_base_model()
        model, load_second = timed(lambda: use_adapter(model, second))
        _, switch = timed(lambda: use_adapter(model, first))
        assert model.get_base_model() is base  # one base model under both adapters
        runs.append({"load_base_model": load_base, "load_first_adapter": load_first,
                     "load_second_adapter": load_second, "switch_adapter": switch})
    folder = resolve_model_folder(model) / ADAPTERS_FOLDER
    result = {"runs": runs, "median_seconds": {key: statistics.median(run[key] for run in runs) for key in runs[0]},
              "adapter_bytes": {name: sum(f.stat().st_size for f in (folder / name).iterdir())
                                for name in (first, second)}}
    (Path(config["output_dir"]) / "switching.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["median_seconds"]), result["adapter_bytes"])


if __name__ == "__main__":
    main()
