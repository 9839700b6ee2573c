"""Duplicates, and the products that must not be cut across splits.

An exact duplicate is the same bytes under two names; a near-duplicate is the same
photograph stored twice in other bytes (resized, re-encoded), found by the perceptual
hash. Either kind in train and in test makes the test measure memory instead of
recognition, so exact duplicates always count as one product, and near-duplicates do
with `--group_near_duplicates` (they are always reported). Everything here works on
indices into one list of images, in a fixed order, so the result is reproducible.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional, Sequence

from data_pipeline.conversion.catalogue import perceptual_hash


class UnionFind:
    """Disjoint sets of 0..n-1; each set is named by its smallest member."""

    def __init__(self, size: int):
        self._parent = list(range(size))

    def find(self, i: int) -> int:
        while self._parent[i] != i:
            self._parent[i] = self._parent[self._parent[i]]
            i = self._parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self._parent[max(a, b)] = min(a, b)

    def sets(self) -> list[list[int]]:
        """Every set, members ascending, sets ordered by their smallest member."""
        members: dict[int, list[int]] = collections.defaultdict(list)
        for i in range(len(self._parent)):
            members[self.find(i)].append(i)
        return [members[k] for k in sorted(members)]


@dataclasses.dataclass(frozen=True)
class NearDuplicateSet:
    members: tuple[int, ...]  # indices, ascending
    max_distance: int  # the largest hash distance of a pair that joined the set


def exact_duplicate_sets(sha256s: Sequence[str]) -> list[tuple[int, ...]]:
    """Indices sharing a SHA-256, two or more per set, ordered by first member."""
    by_digest: dict[str, list[int]] = collections.defaultdict(list)
    for i, digest in enumerate(sha256s):
        by_digest[digest].append(i)
    return sorted(tuple(v) for v in by_digest.values() if len(v) > 1)


def near_duplicate_sets(sha256s: Sequence[str], hashes: Sequence[int], max_distance: int) -> list[NearDuplicateSet]:
    """Sets of images whose perceptual hashes lie within `max_distance` bits, joined
    transitively, that hold at least two different files (copies of the same bytes
    alone are exact duplicates, reported as such).

    Pairs are sought among distinct files only (the first image of each SHA-256), and
    copies join their first: a catalogue's placeholder picture repeated n times would
    otherwise make n^2/2 pairs (4.5 million, 25 s, for 3,000 copies)."""
    joined = UnionFind(len(hashes))
    first: dict[str, int] = {}
    for i, digest in enumerate(sha256s):
        joined.union(first.setdefault(digest, i), i)
    distinct = sorted(first.values())
    pairs = [(distinct[a], distinct[b], distance)
             for a, b, distance in perceptual_hash.close_pairs([hashes[i] for i in distinct], max_distance)]
    for i, j, _ in pairs:
        joined.union(i, j)
    widest: dict[int, int] = collections.defaultdict(int)
    for i, _, distance in pairs:
        root = joined.find(i)
        widest[root] = max(widest[root], distance)
    return [NearDuplicateSet(tuple(members), widest[members[0]]) for members in joined.sets()
            if len({sha256s[i] for i in members}) > 1]


def product_units(groups: Sequence[Optional[str]], exact: Sequence[tuple[int, ...]],
                  near: Sequence[NearDuplicateSet], group_near: bool) -> list[list[int]]:
    """The units a split may not cut: images of one group id, joined with their exact
    duplicates (and near-duplicates when `group_near`); an image with no group and no
    duplicate is a unit of its own. Ordered by smallest member."""
    joined = UnionFind(len(groups))
    first_of_group: dict[str, int] = {}
    for i, group in enumerate(groups):
        if group is not None:
            joined.union(first_of_group.setdefault(group, i), i)
    for members in list(exact) + ([s.members for s in near] if group_near else []):
        for i in members[1:]:
            joined.union(members[0], i)
    return joined.sets()
