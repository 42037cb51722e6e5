"""The one dataset value every part of kdrec_jax consumes: `Interactions`.

Users and items are contiguous ids from 0. Training interactions and each held-out split are CSR
matrices of item ids (sorted, unique within a row). Leave-one-out gives each held-out row at most
one item; a ratio split gives several.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def _csr_from_rows(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
  indptr = np.zeros(len(rows) + 1, dtype=np.int64)
  np.cumsum(lengths, out=indptr[1:])
  indices = (np.concatenate([np.sort(np.asarray(r, np.int32)) for r in rows])
             if rows and indptr[-1] else np.zeros(0, np.int32))
  return indptr, indices.astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Interactions:
  """Implicit feedback split into train / validation / test, as CSR over contiguous ids."""
  name: str
  num_users: int
  num_items: int
  train_indptr: np.ndarray   # int64 [U+1]
  train_indices: np.ndarray  # int32 [nnz], sorted within each user's row
  val_indptr: np.ndarray
  val_indices: np.ndarray
  test_indptr: np.ndarray
  test_indices: np.ndarray

  @classmethod
  def from_rows(cls, name: str, num_items: int, train: list, val: list, test: list
                ) -> "Interactions":
    """Builds the value from per-user lists of item ids (one list per user, same length)."""
    if not len(train) == len(val) == len(test):
      raise ValueError("train/val/test must have one row per user")
    tp, ti = _csr_from_rows(train)
    vp, vi = _csr_from_rows(val)
    sp, si = _csr_from_rows(test)
    out = cls(name, len(train), int(num_items), tp, ti, vp, vi, sp, si)
    out.validate()
    return out

  def validate(self) -> None:
    for split in ("train", "val", "test"):
      indptr, indices = self.split(split)
      if indptr.shape != (self.num_users + 1,) or indptr[0] != 0 or indptr[-1] != len(indices):
        raise ValueError(f"{self.name}: {split} CSR indptr is inconsistent")
      if np.any(np.diff(indptr) < 0):
        raise ValueError(f"{self.name}: {split} CSR indptr is not monotone")
      if len(indices) and (indices.min() < 0 or indices.max() >= self.num_items):
        raise ValueError(f"{self.name}: {split} item id out of range [0, {self.num_items})")

  def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of 'train', 'val' or 'test'."""
    if name not in ("train", "val", "test"):
      raise ValueError(f"unknown split {name!r}; expected train, val or test")
    return getattr(self, f"{name}_indptr"), getattr(self, f"{name}_indices")

  @property
  def num_train(self) -> int:
    return int(self.train_indptr[-1])

  @property
  def item_popularity(self) -> np.ndarray:
    """Training interactions per item, int64 [I]."""
    return np.bincount(self.train_indices, minlength=self.num_items).astype(np.int64)

  def train_pairs(self) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) int32 arrays of every training interaction, user-major."""
    users = np.repeat(np.arange(self.num_users, dtype=np.int32), np.diff(self.train_indptr))
    return users, self.train_indices.copy()

  def max_row_length(self, split: str = "train") -> int:
    indptr, _ = self.split(split)
    return int(np.diff(indptr).max()) if self.num_users else 0

  def __repr__(self) -> str:
    return (f"Interactions({self.name!r}: {self.num_users} users x {self.num_items} items, "
            f"{self.num_train} train, {len(self.val_indices)} val, {len(self.test_indices)} test)")
