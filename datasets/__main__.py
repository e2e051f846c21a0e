"""`python -m datasets --dataset_code CODE [data flags]`: prepare a dataset and print its statistics as JSON."""

import json
import sys

from config import PREPARE, data_config, run_cli
from datasets import load_split


def run(flags) -> None:
    print(json.dumps(load_split(data_config(flags)).stats()))


def main(argv: list[str] | None = None) -> int:
    return run_cli(PREPARE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
