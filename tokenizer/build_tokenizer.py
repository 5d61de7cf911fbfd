"""Stage: build the crystallm tokenizer from the text format and save it (HF files).

    python tokenizer/build_tokenizer.py configs/tokenizer.yaml

The committed files in tokenizer/crystallm-tokenizer/ are this stage's output; a test checks that they
still equal what the current format builds.
"""

from crystallm.stage_config import read_stage_config
from crystallm.tokenization import CrystaLLMTokenizer


def main() -> None:
    config = read_stage_config(__doc__)
    tokenizer = CrystaLLMTokenizer.from_format()
    tokenizer.model_max_length = config["model_max_length"]
    tokenizer.save_pretrained(config["output_dir"])
    print(f"saved {len(tokenizer)} tokens to {config['output_dir']}")


if __name__ == "__main__":
    main()
