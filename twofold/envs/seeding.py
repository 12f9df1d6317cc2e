"""Level seeds: which task instance the k-th group of a run plays, and which split it draws from.

Run seeds are offset for held-out evaluation and for warm-start demonstrations, so their levels never
overlap training's (and a dataset env serves its eval split to evaluation).
"""

LEVELS_PER_SEED = 1_000_003
DEMO_SEED_OFFSET, EVAL_SEED_OFFSET = 200_000, 100_000


def level_seed(seed: int, group_index: int) -> int:
    """Task instance of the k-th group: the same for every old-logit source, so comparisons are paired."""
    return seed * LEVELS_PER_SEED + group_index


def split_of_level(level: int) -> tuple[str, int, int]:
    """(split, run seed, group index) of a level seed: "eval" for `twofold eval`'s levels, else "train"."""
    seed, k = divmod(level, LEVELS_PER_SEED)
    return ("eval" if EVAL_SEED_OFFSET <= seed < DEMO_SEED_OFFSET else "train"), seed, k
