"""`python -m datasets --dataset_code CODE [flags]`: prepare a dataset and print its statistics as JSON."""

import json
import sys

from config import parse_config
from datasets import load_split
from trainer.utils import InputError


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        split = load_split(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(split.stats()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
