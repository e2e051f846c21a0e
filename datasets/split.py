"""From raw interactions + titles to the paper's leave-one-out split (one path for every dataset)."""

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from utils.errors import InputError


@dataclass
class SplitData:
    """Users are 0..num_users-1; items are 1..num_items (0 is padding everywhere).

    A published split (datasets/published.py) may hold training-only users: val[u] == test[u] == 0, trained on and
    never evaluated. Splits made here evaluate every user."""

    name: str
    train: list[list[int]]  # train[u]: item ids in chronological order
    val: list[int]  # val[u]: the second-to-last item (0: a training-only user)
    test: list[int]  # test[u]: the last item (0: a training-only user)
    titles: list[str]  # titles[i] for item i; titles[0] == ""; "" for an item without a title (published splits)
    user_raw_ids: list[str]
    item_raw_ids: list[str]  # item_raw_ids[0] == ""
    fingerprint: str
    published: dict | None = None  # a published split's record (published_split.json): source file, sha256

    @property
    def num_users(self) -> int:
        return len(self.train)

    @property
    def num_items(self) -> int:
        return len(self.item_raw_ids) - 1

    def eval_users(self) -> np.ndarray:
        """The users with a validation and a test item (every user, except a published split's training-only ones)."""
        return np.flatnonzero(np.asarray(self.val, dtype=np.int64) != 0)

    def stats(self) -> dict:
        evaluated = len(self.eval_users())
        interactions = sum(len(seq) for seq in self.train) + 2 * evaluated
        stats = {
            "dataset": self.name,
            "users": self.num_users,
            "evaluated_users": evaluated,
            "items": self.num_items,
            "interactions": interactions,
            "avg_length": round(interactions / self.num_users, 2),
        }
        if self.published is not None:
            stats["published"] = {k: self.published[k] for k in ("source", "sha256") if k in self.published}
        return stats


def k_core(df: pd.DataFrame, min_uc: int, min_sc: int) -> pd.DataFrame:
    """Iteratively drop items with < min_sc and users with < min_uc interactions until stable."""
    while True:
        item_counts = df["item"].map(df["item"].value_counts())
        user_counts = df["user"].map(df["user"].value_counts())
        keep = (item_counts >= min_sc) & (user_counts >= min_uc)
        if keep.all():
            return df
        df = df[keep]


def sorted_ids(values: pd.Series) -> list[str]:
    """Deterministic id order (not set() order): numeric when every id is an integer, else lexicographic."""
    unique = pd.unique(values)
    if all(v.isdigit() for v in unique):
        return sorted(unique, key=lambda v: (int(v), v))
    return sorted(unique)


def split_fingerprint(
    train: list[list[int]], val: list[int], test: list[int], users: list[str], items: list[str]
) -> str:
    digest = hashlib.sha256()
    digest.update("\x1f".join(users).encode())
    digest.update(b"\x1e")
    digest.update("\x1f".join(items).encode())
    for seq in train:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
        digest.update(b"|")
    digest.update(np.asarray(val, dtype=np.int64).tobytes())
    digest.update(np.asarray(test, dtype=np.int64).tobytes())
    return digest.hexdigest()


def make_split(
    interactions: pd.DataFrame,
    titles: dict[str, str],
    *,
    name: str,
    min_rating: float = 0,
    min_uc: int = 5,
    min_sc: int = 5,
    source: str = "interactions",
) -> SplitData:
    """interactions: columns user, item (str), timestamp (numeric), optional rating.

    Drops items without a title, applies min_rating, keeps the first of repeated (user, item) interactions,
    applies the iterative k-core, densifies ids in sorted raw-id order, orders each user's items by
    (timestamp, item id) — ties in timestamp go to the smaller item id — and holds out the last item (test)
    and the one before it (validation).
    """
    df = interactions[interactions["item"].isin(titles.keys())]
    if df.empty:
        raise InputError(f"{source}: none of its {interactions['item'].nunique()} items has a title")
    if min_rating > 0:
        if "rating" not in df.columns:
            raise InputError(f"--min_rating {min_rating}: expected a rating column in {source}, found none")
        df = df[df["rating"] >= min_rating]
    repeats = df.duplicated(["user", "item"])
    if repeats.any():
        # Evaluation masks the user's history, so a repeated item held out for validation/test could only
        # ever count as a miss: keep each (user, item)'s first interaction.
        print(f"note: {source}: {int(repeats.sum())} repeated (user, item) interactions; keeping the first of each")
        df = df.sort_values("timestamp", kind="stable").drop_duplicates(["user", "item"], keep="first")
    df = k_core(df, min_uc, min_sc)
    if df.empty:
        raise InputError(
            f"{source}: no interactions left after the k-core filter (--min_uc {min_uc}, --min_sc {min_sc}, "
            f"--min_rating {min_rating}); lower them or use more data"
        )
    user_raw_ids = sorted_ids(df["user"])
    item_raw_ids = sorted_ids(df["item"])
    user_index = pd.Series(np.arange(len(user_raw_ids)), index=user_raw_ids)
    item_index = pd.Series(np.arange(1, len(item_raw_ids) + 1), index=item_raw_ids)
    users = user_index[df["user"].to_numpy()].to_numpy()
    items = item_index[df["item"].to_numpy()].to_numpy()
    order = np.lexsort((items, df["timestamp"].to_numpy(), users))
    users, items = users[order], items[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    sequences = [seq.tolist() for seq in np.split(items, bounds)]
    train = [seq[:-2] for seq in sequences]
    val = [seq[-2] for seq in sequences]
    test = [seq[-1] for seq in sequences]
    item_titles = [""] + [titles[raw] for raw in item_raw_ids]
    return SplitData(
        name=name,
        train=train,
        val=val,
        test=test,
        titles=item_titles,
        user_raw_ids=list(user_raw_ids),
        item_raw_ids=[""] + list(item_raw_ids),
        fingerprint=split_fingerprint(train, val, test, list(user_raw_ids), [""] + list(item_raw_ids)),
    )
