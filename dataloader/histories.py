"""User histories to recommend for (recommend.py's input): JSONL or CSV files, standard input, or existing users of a
dataset, resolved to the dataset's item indices.

A malformed line or row rejects the whole input with an error naming every bad line (up to five): a history read
wrongly would give recommendations that look fine and are not.
"""

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets.split import SplitData
from utils.errors import InputError

JSONL_SHAPE = '{"user": id, "history": [item ids, oldest first]}'
SHOWN_ERRORS = 5


@dataclass
class Request:
    user: str
    items: list[str]  # raw item ids, oldest first
    known: list[int] = field(default_factory=list)  # their item indices (unknown ids dropped)
    unknown: int = 0


def read_input_text(path: str | Path) -> tuple[str, str]:
    """(text, name) of --input: a file, or standard input for '-'; UTF-8, with or without a byte order mark."""
    if str(path) == "-":
        data, name = sys.stdin.buffer.read(), "standard input"
    else:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"--input: {path} not found (a JSONL or CSV file, or - for standard input)")
        data, name = path.read_bytes(), str(path)
    try:
        return data.decode("utf-8-sig"), name  # -sig: drops the byte order mark Excel writes at the start
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: expected UTF-8 text, found a byte that is not ({e})") from None


def read_requests(path: str | Path) -> list[Request]:
    """JSONL ({"user": id, "history": [item ids, oldest first]} per line) or CSV (user_id,item_id[,timestamp];
    without timestamp, rows are taken in file order). A .csv / .jsonl / .json name decides the format; otherwise
    (standard input included) a first character '{' means JSONL."""
    text, name = read_input_text(path)
    suffix = Path(str(path)).suffix.lower()
    is_jsonl = suffix in (".jsonl", ".json") or (suffix != ".csv" and text.lstrip().startswith("{"))
    requests = read_jsonl(text, name) if is_jsonl else read_csv(text, name)
    if not requests:
        raise InputError(f"{name}: expected at least one history, found none")
    return requests


def _reject(name: str, errors: list[str], expected: str) -> None:
    if errors:
        more = f" (and {len(errors) - SHOWN_ERRORS} more)" if len(errors) > SHOWN_ERRORS else ""
        raise InputError(f"{name}: expected {expected}; found " + "; ".join(errors[:SHOWN_ERRORS]) + more)


def _is_id(value) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip() != ""


def parse_history_line(line: str) -> Request:
    """One JSONL record; ValueError saying what is wrong with it."""
    record = json.loads(line)
    if not isinstance(record, dict) or "user" not in record or "history" not in record:
        raise ValueError("not an object with 'user' and 'history'")
    if not _is_id(record["user"]):
        raise ValueError(f"user {record['user']!r} is not a string or integer id")
    history = record["history"]
    if not isinstance(history, list):
        raise ValueError(f"history is a {type(history).__name__}, not a list of item ids")
    bad = [item for item in history if not _is_id(item)]
    if bad:
        raise ValueError(f"history holds {bad[0]!r}, not a string or integer item id")
    return Request(str(record["user"]), [str(item) for item in history])


def read_jsonl(text: str, name: str) -> list[Request]:
    requests, errors = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            requests.append(parse_history_line(line))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            errors.append(f"line {number}: {e} ({line[:60]!r})")
    _reject(name, errors, f"one {JSONL_SHAPE} per line")
    return requests


def read_csv(text: str, name: str) -> list[Request]:
    rows = list(csv.DictReader(text.splitlines()))
    columns = set(rows[0]) if rows else set()
    if not {"user_id", "item_id"} <= columns:
        raise InputError(f"{name}: expected CSV columns user_id,item_id[,timestamp], found {sorted(map(str, columns))}")
    needed = ["user_id", "item_id"] + (["timestamp"] if "timestamp" in columns else [])
    errors = []
    for number, row in enumerate(rows, 2):  # line 1 is the header
        missing = [column for column in needed if not (row.get(column) or "").strip()]
        if missing:
            errors.append(f"line {number}: no {', '.join(missing)}")
        elif "timestamp" in columns and not _is_number(row["timestamp"]):
            errors.append(f"line {number}: timestamp {row['timestamp']!r} is not a number")
    _reject(name, errors, "user_id,item_id[,timestamp] in every row")
    if "timestamp" in columns:
        rows.sort(key=lambda row: float(row["timestamp"]))  # stable: equal timestamps keep file order
    by_user: dict[str, list[str]] = {}
    for row in rows:
        by_user.setdefault(row["user_id"], []).append(row["item_id"])
    return [Request(user, items) for user, items in by_user.items()]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def requests_for_users(split: SplitData, users: list[str]) -> list[Request]:
    """Existing users: their whole known sequence (training items, then validation and test items)."""
    index = {raw: u for u, raw in enumerate(split.user_raw_ids)}
    missing = [user for user in users if user not in index]
    if missing:
        raise InputError(f"--users: {len(missing)} ids not in dataset {split.name!r} (first: {missing[0]!r})")
    requests = []
    for user in users:
        u = index[user]
        held_out = [i for i in (split.val[u], split.test[u]) if i]  # none for a published split's training-only user
        requests.append(Request(user, [split.item_raw_ids[i] for i in [*split.train[u], *held_out]]))
    return requests


def resolve_items(requests: list[Request], split: SplitData) -> int:
    """Fill each request's known item indices; return the number of unknown ids skipped."""
    index = {raw: i for i, raw in enumerate(split.item_raw_ids) if i}
    for request in requests:
        request.known = [index[item] for item in request.items if item in index]
        request.unknown = len(request.items) - len(request.known)
    return sum(request.unknown for request in requests)
