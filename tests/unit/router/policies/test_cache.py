"""router/policies/cache.py: the rank that holds more of the prompt wins within the bound; load
decides the rest. Pure, with hypothesis (the cache's own reading is tests/unit/kvcache/)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from policies_fakes import routed

from vllm_dp_supervisor.kvcache.holdings import Holdings
from vllm_dp_supervisor.router.policies import cache
from vllm_dp_supervisor.router.policies.load import Load


def first(): return 0.0


def choose(candidates, held, blocks, inflight, indexed, bound, weight, rand) -> int:
    load = Load(bound, rand)
    load.inflight.update(inflight)
    return cache.choose(candidates, Holdings(dict(held), blocks, dict(indexed), 4), load, weight)


def test_the_rank_holding_the_prompt_wins_over_an_idle_one_within_the_bound():
    assert choose([0, 1], {0: 8, 1: 0}, 10, {0: 1, 1: 0}, {}, 1.25, 2.0, first) == 0


def test_a_rank_over_the_bound_is_passed_over_whatever_it_holds():
    assert choose([0, 1], {0: 10, 1: 0}, 10, {0: 6, 1: 0}, {}, 1.25, 2.0, first) == 1


def test_without_a_hit_it_is_least_requests_then_the_emptier_cache():
    assert choose([0, 1, 2], {}, 10, {0: 2, 1: 1, 2: 1}, {1: 50, 2: 10}, 1.25, 2.0, first) == 2


def test_a_prompt_under_one_block_goes_by_load():
    assert choose([0, 1], {0: 0, 1: 0}, 0.5, {0: 1, 1: 0}, {}, 1.25, 2.0, first) == 1


def test_the_rank_a_prefix_went_to_last_is_credited_half_its_blocks():
    """Evicted everywhere (held nowhere), the prefix goes back where it went within the bound;
    a rank holding the whole prefix still wins over the remembered one."""
    def pick(held, inflight, recalled, block_size=4):
        load = Load(1.25, first)
        load.inflight.update(inflight)
        return cache.choose([0, 1], Holdings(held, 10 if block_size else 0, {}, block_size, (), recalled, 40), load,
                            2.0)
    assert pick({0: 0, 1: 0}, {0: 1, 1: 0}, (0, 24)) == 0  # recalled: 24 tokens, 6 blocks
    assert pick({0: 0, 1: 6}, {0: 0, 1: 0}, (0, 24)) == 1
    assert pick({0: 0, 1: 0}, {0: 3, 1: 0}, (0, 24)) == 1  # over the bound: by load
    assert pick({}, {0: 1, 1: 0}, (0, 24), block_size=0) == 0  # before any engine said its block size
    assert cache.RECALLED_SHARE == 0.5


def test_ties_are_broken_by_the_random_draw():
    assert {choose([0, 1], {}, 4, {}, {}, 1.25, 2.0, lambda r=r: r) for r in (0.1, 0.9)} == {0, 1}


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 12)), min_size=2, max_size=6),
       st.integers(1, 20), st.floats(0.5, 4))
def test_a_rank_holding_more_than_one_over_weight_more_of_the_prompt_beats_any_within_the_bound(ranks, blocks,
                                                                                                 weight):
    held = {r: min(h, blocks) for r, (h, _) in enumerate(ranks)}
    inflight = {r: n for r, (_, n) in enumerate(ranks)}
    chosen = choose(list(held), held, blocks, inflight, {}, 1.25, weight, first)
    cap = math.ceil(1.25 * (sum(inflight.values()) + 1) / len(held))
    within = [r for r in held if inflight[r] + 1 <= cap]
    assert chosen in (within or list(held))
    for r in within:
        assert not (held[r] - held[chosen]) / blocks * weight > 1, (r, chosen)


class FakeCache:
    """What the cache policy uses of kvcache.CacheRouting: holdings per request, told where it went."""
    def __init__(self, holdings: Holdings | None) -> None:
        self.answer, self.asked, self.placements, self.followed, self.closed = holdings, [], [], [], False

    def holdings(self, path, request, candidates):
        self.asked.append((path, request, list(candidates)))
        return self.answer

    def placed(self, rank, holdings):
        self.placements.append(rank)

    def follow(self, engines):
        self.followed.append(dict(engines))

    def report(self):
        return {"ranks": {}}

    def close(self):
        self.closed = True


def test_the_policy_places_by_what_the_ranks_hold_and_by_load_when_the_cache_cannot_read_it():
    holding = FakeCache(Holdings({0: 0, 1: 3}, 4.0, {0: 10, 1: 10}, 16))
    policy = cache.Cache(Load(1.25), holding, 2.0)  # type: ignore[arg-type]
    request = routed(b'{"prompt": "p"}', b"/v1/completions?x=1")
    assert policy.pick(request, [0, 1]) == 1 and holding.placements == [1]
    assert holding.asked == [("/v1/completions", {"prompt": "p"}, [0, 1])]  # the path without its query
    unread = FakeCache(None)
    by_load = cache.Cache(Load(1.25), unread, 2.0)  # type: ignore[arg-type]
    by_load.load.inflight.update({0: 2, 1: 0})
    assert by_load.pick(request, [0, 1]) == 1 and unread.placements == []
    policy.follow({0: (1, True)})
    assert holding.followed == [{0: (1, True)}]
    report = policy.report()["cache"]
    assert report["ranks"] == {} and sum(report["lookup"][0]) == 1  # one placement timed
    policy.close()
    assert holding.closed


def test_build_makes_the_policy_the_settings_name_and_loads_kvcache_only_for_cache():
    import subprocess
    import sys
    code = ("import sys\nfrom vllm_dp_supervisor.router import policies\n"
            "from vllm_dp_supervisor.settings.options import parse_config\n"
            "for name in ('least-requests', 'round-robin', 'prefix', 'session'):\n"
            "    s = parse_config(['--dp-size-local', '2', '--router-policy', name], {}).router_settings\n"
            "    print(type(policies.build(s)).__name__)\n"
            "print('vllm_dp_supervisor.kvcache' in sys.modules, 'zmq' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["LeastRequests", "RoundRobin", "Prefix", "Session", "False", "False"]


class FakeRouting:
    """kvcache.CacheRouting's face to the policy: fixed holdings, what it was told."""

    def __init__(self, holdings):
        self._holdings = holdings
        self.told = []

    def holdings(self, path, request, candidates):
        return self._holdings

    def placed(self, rank, holdings):
        pass

    def checked(self, rank, predicted, cached):
        self.told.append((rank, predicted, cached))


def test_a_pick_predicts_the_tokens_its_rank_holds_and_is_told_what_it_hit():
    routing = FakeRouting(Holdings({0: 3, 1: 1}, 5, {}, 4))
    policy = cache.Cache(Load(1.25, first), routing, 2.0)
    assert policy.pick(routed(b'{"prompt": "hi"}', b"/v1/completions"), [0, 1]) == 0
    assert policy.predicted == 12  # 3 blocks of 4
    policy.checked(0, 12, 8)
    assert routing.told == [(0, 12, 8)]
    for unchecked in (b'{"prompt": ["a", "b"]}', b'{"prompt": "hi", "n": 2}', b'{"prompt": ["hi"], "n": 2}',
                      b'{"prompt": "hi", "use_beam_search": true}', b'{"prompt": [[1, 2]], "use_beam_search": true}'):
        policy.pick(routed(unchecked, b"/v1/completions"), [0, 1])
        assert policy.predicted is None, unchecked  # its usage would not be this prediction's
    policy.pick(routed(b'{"prompt": ["one"]}', b"/v1/completions"), [0, 1])
    assert policy.predicted == 12
    routing._holdings = None  # placed by load: nothing predicted
    policy.pick(routed(b'{"prompt": "hi"}', b"/v1/completions"), [0, 1])
    assert policy.predicted is None
