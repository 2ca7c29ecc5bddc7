import random

from app.router.prefix_index import PrefixIndex, SpeculativeEntries


def chain(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(n)]


def test_match_counts_leading_blocks_per_replica():
    index = PrefixIndex()
    index.add_replica("a", 1000)
    index.add_replica("b", 1000)
    prompt = chain(1, 10)
    index.add("a", prompt)
    index.add("b", prompt[:4])
    assert index.match(prompt) == {"a": 10, "b": 4}
    # A gap ends the prefix even if later blocks are held.
    index.remove("a", prompt[2:3])
    assert index.match(prompt) == {"a": 2, "b": 4}
    assert index.match(chain(2, 5)) == {}


def test_block_removed_and_cleared_and_replica_removal():
    index = PrefixIndex()
    index.add_replica("a", 1000)
    index.add_replica("b", 1000)
    prompt = chain(3, 8)
    index.add("a", prompt)
    index.add("b", prompt)
    index.clear("a")
    assert index.match(prompt) == {"b": 8} and index.num_blocks("a") == 0
    index.remove_replica("b")
    assert index.match(prompt) == {} and index.replicas == ["a"]


def test_bounded_per_replica_by_engine_capacity_evicting_least_recent():
    index = PrefixIndex()
    index.add_replica("a", 100)
    old, new = chain(4, 60), chain(5, 60)
    index.add("a", old)
    index.add("a", new)
    assert index.num_blocks("a") <= 100
    assert index.match(new) == {"a": 60}
    assert index.match(old).get("a", 0) < 60


def test_grows_and_survives_many_replicas_and_churn():
    index = PrefixIndex(initial_capacity=16)
    for r in range(130):  # more than two 64-bit words of replica bits
        index.add_replica(f"r{r}", 10_000)
    prompts = [chain(10 + i, 50) for i in range(40)]
    for i, p in enumerate(prompts):
        index.add(f"r{(i * 7) % 130}", p)
    for i, p in enumerate(prompts):
        assert index.match(p)[f"r{(i * 7) % 130}"] == 50
    for i, p in enumerate(prompts[:20]):
        index.remove(f"r{(i * 7) % 130}", p)
    assert all(index.match(p) == {} for p in prompts[:20])
    assert all(index.match(p) for p in prompts[20:])
    assert index.entries() == 20 * 50


def speculation_on_two_replicas() -> tuple[PrefixIndex, SpeculativeEntries]:
    index = PrefixIndex()
    index.add_replica("a", 100)
    index.add_replica("b", 100)
    return index, SpeculativeEntries(index, ttl_s=2.0)


def test_speculative_entries_add_to_matches_and_expire():
    index, spec = speculation_on_two_replicas()
    prompt = chain(6, 6)
    index.add("a", prompt[:2])
    spec.add("b", prompt, now=0.0)
    assert index.match(prompt, spec.rows(prompt)) == {"a": 2, "b": 6}
    spec.expire(now=3.0)
    assert spec.rows(prompt) is None
    assert index.match(prompt, spec.rows(prompt)) == {"a": 2}


def test_speculative_guesses_are_refreshed_by_a_later_route_and_dropped_with_their_replica():
    index, spec = speculation_on_two_replicas()
    prompt = chain(7, 4)
    spec.add("a", prompt, now=0.0)
    spec.add("b", prompt, now=0.0)
    spec.add("a", prompt, now=1.5)  # routed again: the guess lives on
    spec.expire(now=2.5)
    assert index.match(prompt, spec.rows(prompt)) == {"a": 4}
    spec.drop_replica("a")
    index.remove_replica("a")
    index.add_replica("c", 100)  # takes the freed bit
    assert spec.rows(prompt) is None
    assert index.match(prompt, spec.rows(prompt)) == {}
