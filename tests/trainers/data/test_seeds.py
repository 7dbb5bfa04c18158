"""The one seed derivation gives the numbers the five copies of its arithmetic gave, and is the only copy."""
from pathlib import Path

from trainers.data.seeds import SEED_STRIDE, derive_seed, rank_seed

ROOT = Path(__file__).resolve().parents[3]


def test_the_numbers_of_before():
    for seed in (0, 1, 7, 12345):
        for step in (0, 1, 99, 10**6):
            assert derive_seed(seed, step) == seed * 1_000_003 + step                       # epochs, probe samples
            for world, rank in ((1, 0), (2, 1), (4, 3)):
                assert rank_seed(derive_seed(seed, step), rank, world) == (seed * 1_000_003 + step) * world + rank  # PPO
            assert derive_seed(step % 5, seed) == seed + 1_000_003 * (step % 5)              # actor i of a request
    assert SEED_STRIDE == 1_000_003


def test_no_other_copy_of_the_arithmetic():
    copies = [str(p.relative_to(ROOT)) for package in ("infra", "trainers", "rollout", "probes", "sweeps")
              for p in (ROOT / package).rglob("*.py") if "1_000_003" in p.read_text() or "1000003" in p.read_text()]
    assert copies == ["trainers/data/seeds.py"]
