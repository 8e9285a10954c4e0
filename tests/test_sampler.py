"""The NumPy reference sampler against direct NumPy computations, plus SamplingParams validation.

Distribution tests draw many samples in ONE batched call (the same row repeated) with a fixed rng,
so they are deterministic; chi-square critical values are for alpha = 1e-3.
"""
import math

import numpy as np
import pytest

from rvllm.outputs import Logprob
from rvllm.sampling.logprobs import LogprobsRow, compute_prompt_logprobs, to_logprob_dicts
from rvllm.sampling.metadata import SamplingMetadata
from rvllm.sampling.sampler import Sampler
from rvllm.sampling_params import SamplingParams


def meta_for(params, prompts=None, outputs=None, eos=None) -> SamplingMetadata:
    n = len(params)
    prompts = prompts or [[] for _ in range(n)]
    outputs = outputs or [[] for _ in range(n)]
    eos = eos if eos is not None else [None] * n
    return SamplingMetadata.from_requests(list(zip(params, prompts, outputs, eos)))


def repeat(params: SamplingParams, logits_row: np.ndarray, n: int):
    """n copies of one request: n independent draws from its distribution in one call."""
    return np.tile(logits_row.astype(np.float32), (n, 1)), meta_for([params] * n)


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def chi2_critical(dof: int, z: float = 3.0902) -> float:
    """Upper critical value of chi-square(dof) at alpha = 1e-3 (z = its normal quantile), by the
    Wilson-Hilferty approximation (within ~1% for dof >= 3; dof 7 gives 24.3, tables 24.32)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def assert_matches_distribution(tokens, probs, n):
    """Pearson chi-square of the sampled counts against probs (support where probs > 0)."""
    counts = np.bincount(tokens, minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the support"
    expected = probs[support] * n
    assert expected.min() >= 5, "test design: every cell needs an expected count >= 5"
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    assert stat < chi2_critical(dof), (stat, dof, chi2_critical(dof))


RNG_LOGITS = np.random.default_rng(1234).normal(0, 2, size=64).astype(np.float32)


# ---- greedy ------------------------------------------------------------------------------------
def test_greedy_equals_argmax_fast_path():
    logits = np.random.default_rng(0).normal(size=(5, 300)).astype(np.float32)
    out = Sampler()(logits, meta_for([SamplingParams(temperature=0.0)] * 5), np.random.default_rng(0))
    assert out.token_ids == logits.argmax(axis=1).tolist()
    assert out.logprobs == [None] * 5


def test_greedy_rows_take_argmax_of_penalized_logits_in_a_mixed_batch():
    logits = np.zeros((2, 10), np.float32)
    logits[:, 4] = 3.0
    logits[:, 6] = 2.0
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0), SamplingParams(temperature=1.0, top_k=1)]
    # token 4 was generated before: 3.0 / 2 = 1.5 < 2.0, so the argmax moves to token 6
    out = Sampler()(logits, meta_for(params, outputs=[[4], []]), np.random.default_rng(0))
    assert out.token_ids == [6, 4]


# ---- penalties, bias, suppression: exact arithmetic on crafted (binary-exact) values --------------
def test_repetition_penalty_divides_positive_multiplies_negative_over_prompt_and_output():
    logits = np.array([[2.0, -1.5, 0.5, 3.0, -0.25, 1.0]], np.float32)
    meta = meta_for([SamplingParams(repetition_penalty=2.0)], prompts=[[0, 1, 1]], outputs=[[2, 4, 4, 4]])
    got = Sampler.process_logits(logits, meta)
    want = np.array([[1.0, -3.0, 0.25, 3.0, -0.5, 1.0]], np.float32)  # repeats penalized once
    np.testing.assert_array_equal(got, want)
    assert logits[0, 0] == 2.0, "the caller's logits must not be modified"


def test_frequency_and_presence_count_only_output_tokens():
    logits = np.array([[1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    sp = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    meta = meta_for([sp], prompts=[[0, 0, 4]], outputs=[[3, 3, 3, 1]])
    got = Sampler.process_logits(logits, meta)
    # token 3: 1 - 3*0.5 - 0.25; token 1: 1 - 0.5 - 0.25; prompt-only tokens 0, 4 untouched
    np.testing.assert_array_equal(got, [[1.0, 0.25, 1.0, -0.75, 1.0]])


def test_penalties_apply_repetition_first_then_frequency_presence_then_bias():
    logits = np.array([[2.0, -2.0, 0.0]], np.float32)
    sp = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5,
                        logit_bias={0: 0.25, 2: -1.0})
    got = Sampler.process_logits(logits, meta_for([sp], outputs=[[0, 0, 1]]))
    # token 0: 2/2 - 2*1 - 0.5 + 0.25; token 1: -2*2 - 1 - 0.5; token 2: 0 - 1
    np.testing.assert_array_equal(got, [[-1.25, -5.5, -1.0]])


def test_penalties_only_touch_their_own_rows():
    logits = np.ones((3, 4), np.float32)
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0), SamplingParams()]
    got = Sampler.process_logits(logits, meta_for(params, prompts=[[0], [1], [2]], outputs=[[3], [3], [3]]))
    np.testing.assert_array_equal(got, [[1, 1, 1, 1], [1, 0.5, 1, -0.5], [1, 1, 1, 1]])


def test_logit_bias_is_added_and_out_of_range_ids_are_ignored():
    logits = np.zeros((2, 4), np.float32)
    sp = SamplingParams(logit_bias={1: 5.0, 3: -2.5, 99: 7.0})
    got = Sampler.process_logits(logits, meta_for([sp, SamplingParams()]))
    np.testing.assert_array_equal(got, [[0, 5.0, 0, -2.5], [0, 0, 0, 0]])
    # a large positive bias decides the greedy choice
    out = Sampler()(logits, meta_for([sp.clone(temperature=0.0), SamplingParams(temperature=0.0)]),
                    np.random.default_rng(0))
    assert out.token_ids[0] == 1


def test_processing_works_on_non_contiguous_and_half_precision_logits():
    base = np.array([[2.0, -1.0, 0.5], [1.0, 1.0, 1.0]], np.float32)
    meta = meta_for([SamplingParams(repetition_penalty=2.0, logit_bias={2: 1.0}), SamplingParams()],
                    outputs=[[0, 1], []])
    want = np.array([[1.0, -2.0, 1.5], [1.0, 1.0, 1.0]], np.float32)
    np.testing.assert_array_equal(Sampler.process_logits(np.asfortranarray(base), meta), want)
    np.testing.assert_array_equal(Sampler.process_logits(np.asfortranarray(base.astype(np.float16)), meta), want)


def test_min_tokens_suppresses_eos_and_stop_ids_until_reached():
    sp = SamplingParams(min_tokens=2, stop_token_ids=[5])
    m = meta_for([sp, sp, sp.clone(ignore_eos=True)], outputs=[[1], [1, 2], []], eos=[[7, 8], [7], 7])
    assert m.suppress_token_ids == [[5, 7, 8], [], [5]]  # ignore_eos: EOS does not stop, so allowed


def test_suppressed_tokens_are_never_sampled_even_when_most_likely():
    logits = np.zeros(10, np.float32)
    logits[3] = 20.0  # would win essentially every draw
    n = 2000
    x = np.tile(logits, (n, 1))
    params = [SamplingParams(min_tokens=1, temperature=0.0 if i % 2 else 1.0) for i in range(n)]
    m = meta_for(params, eos=[3] * n)
    out = Sampler()(x, m, np.random.default_rng(0))
    assert 3 not in out.token_ids
    assert len(set(out.token_ids)) > 5  # the random rows spread over the 9 remaining tokens


def test_every_token_forbidden_gives_no_nan_and_no_crash():
    logits = np.zeros((2, 3), np.float32)
    meta = meta_for([SamplingParams(min_tokens=1, stop_token_ids=[0, 1, 2]),
                     SamplingParams(min_tokens=1, temperature=0.0, stop_token_ids=[0, 1, 2])])
    out = Sampler()(logits, meta, np.random.default_rng(0))
    assert all(0 <= t < 3 for t in out.token_ids)


# ---- top-k, top-p, min-p: support and thresholds -------------------------------------------------
def test_top_k_leaves_exactly_k_candidates():
    k, n = 7, 20000
    x, m = repeat(SamplingParams(top_k=k), RNG_LOGITS, n)
    out = Sampler()(x, m, np.random.default_rng(1))
    assert set(out.token_ids) == set(np.argsort(-RNG_LOGITS)[:k].tolist())


def reference_nucleus(logits, top_p, temperature=1.0):
    p = softmax64(np.asarray(logits, np.float64) / temperature)
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    return set(order[before < top_p].tolist()), p


@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.95])
def test_top_p_support_is_the_smallest_set_reaching_top_p(top_p):
    n = 20000
    x, m = repeat(SamplingParams(top_p=top_p, temperature=0.8), RNG_LOGITS, n)
    out = Sampler()(x, m, np.random.default_rng(2))
    want, _ = reference_nucleus(RNG_LOGITS, top_p, 0.8)
    assert set(out.token_ids) == want


def test_top_p_always_keeps_at_least_one_token():
    logits = np.array([10.0, 0.0, 0.0, 0.0], np.float32)  # top token already has p > 0.999
    x, m = repeat(SamplingParams(top_p=0.01), logits, 500)
    assert set(Sampler()(x, m, np.random.default_rng(0)).token_ids) == {0}


def test_min_p_drops_tokens_below_min_p_times_max_prob():
    # probs proportional to exp(logit): ratios to the max are exactly 1, 0.5, 0.26, 0.24, 0.1
    logits = np.log(np.array([1.0, 0.5, 0.26, 0.24, 0.1])).astype(np.float32)
    x, m = repeat(SamplingParams(min_p=0.25), logits, 20000)
    assert set(Sampler()(x, m, np.random.default_rng(3)).token_ids) == {0, 1, 2}


def reference_kept(logits_row, temperature, top_k, top_p, min_p):
    """Sorting reference in float64: top-k (ties kept), top-p on the renormalized top-k, min-p."""
    s = (np.asarray(logits_row, np.float64) - logits_row.max()) / temperature
    order = np.argsort(-s, kind="stable")
    keep = np.ones(len(s), bool)
    if 0 < top_k < len(s):
        keep &= s >= s[order[top_k - 1]]
    if top_p < 1.0:
        p = np.where(keep, np.exp(s), 0.0)
        before = np.cumsum(p[order]) - p[order]
        last = order[np.count_nonzero(before < top_p * p.sum()) - 1]
        keep &= s >= s[last]
    if min_p > 0:
        keep &= s >= np.log(min_p)
    return np.flatnonzero(keep)


@pytest.mark.parametrize("candidates,top_ks", [(2, [0, 1, 2]), (16, [0, 0, 5, 16]),
                                                (1024, [0, 1, 5, 40, 299, 300, 1000])])
def test_kept_sets_match_a_sorting_reference(candidates, top_ks):
    """Random rows and knobs; with few candidates most top-p rows take the full-sort fallback."""
    rng = np.random.default_rng(5)
    num, vocab = 200, 300
    logits = (rng.normal(size=(num, vocab)) * rng.uniform(0.5, 6, size=(num, 1))).astype(np.float32)
    params = [SamplingParams(temperature=float(rng.choice([0.5, 1.0, 1.5])),
                             top_k=int(rng.choice(top_ks)),
                             top_p=float(rng.choice([1.0, 0.2, 0.9, 0.99])),
                             min_p=float(rng.choice([0.0, 0.0, 0.01, 0.2]))) for _ in range(num)]
    kept = Sampler(top_p_candidates=candidates).kept_tokens(logits, meta_for(params))
    for i, sp in enumerate(params):
        want = reference_kept(logits[i], sp.temperature, sp.top_k, sp.top_p, sp.min_p)
        np.testing.assert_array_equal(kept[i], want, err_msg=str(sp))


@pytest.mark.parametrize("vocab,m", [(1000, 1), (1000, 51), (1001, 125), (1000, 400), (37, 5)])
def test_top_m_pruning_finds_the_m_largest(vocab, m):
    from rvllm.sampling.sampler import _top_m_ids
    rng = np.random.default_rng(vocab + m)
    x = rng.normal(0, 3, size=(6, vocab)).astype(np.float32)
    x[1] = np.round(x[1])  # many ties
    x[2, : vocab // 2] = -np.inf  # whole pruning sets at -inf
    x[3] = 0.0  # all equal
    x[4, rng.choice(vocab, size=m, replace=False)] += 100.0  # a clear top m
    ids = _top_m_ids(x, m)
    assert ids.shape == (6, m)
    for i in range(6):
        assert len(set(ids[i].tolist())) == m
        np.testing.assert_array_equal(np.sort(x[i, ids[i]]), np.sort(x[i])[vocab - m:])


def test_ties_with_the_last_kept_token_are_kept_even_across_the_candidate_cut():
    vocab = 3000
    logits = np.full((3, vocab), 1.0, np.float32)
    logits[:, 0] = 5.0
    params = [SamplingParams(top_k=2), SamplingParams(top_k=1), SamplingParams(temperature=0.0)]
    kept = Sampler().kept_tokens(logits, meta_for(params))
    # top-k=2: the 2nd best logit (1.0) is shared by every other token, all of them stay (vLLM/HF)
    assert len(kept[0]) == vocab and kept[1].tolist() == [0] and kept[2] is None


def test_zero_exponential_draws_cannot_pick_a_filtered_token():
    """float32 Exp(1) draws can be exactly 0; 0/0 = NaN must not win the argmax race."""
    class ZeroRng:
        def standard_exponential(self, size=None, dtype=None, out=None):
            if out is not None:
                out[...] = 0.0
                return out
            return np.zeros(size, dtype)

    logits = np.array([[0.0, 1.0, 5.0, 2.0]], np.float32)
    out = Sampler()(logits, meta_for([SamplingParams(top_k=1)]), ZeroRng())
    assert out.token_ids == [2]


# ---- distributions: chi-square ------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_sampling_matches_softmax_of_scaled_logits(temperature):
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7], np.float32)
    n = 30000
    x, m = repeat(SamplingParams(temperature=temperature), logits, n)
    out = Sampler()(x, m, np.random.default_rng(10))
    assert_matches_distribution(np.array(out.token_ids), softmax64(logits / temperature), n)


def test_top_p_sampling_matches_the_renormalized_nucleus():
    logits = np.array([2.0, 1.6, 1.2, 0.5, 0.1, -0.3, -1.0, -2.0], np.float32)
    n = 30000
    x, m = repeat(SamplingParams(top_p=0.8, temperature=0.9), logits, n)
    nucleus, p = reference_nucleus(logits, 0.8, 0.9)
    target = np.where(np.isin(np.arange(len(p)), list(nucleus)), p, 0.0)
    out = Sampler()(x, m, np.random.default_rng(11))
    assert_matches_distribution(np.array(out.token_ids), target / target.sum(), n)


def test_seeded_row_over_successive_steps_matches_the_distribution():
    """One seed, steps 0..n-1: the per-step Philox streams must behave like fresh draws."""
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -1.0], np.float32)
    n = 20000
    x = np.tile(logits, (n, 1))
    m = meta_for([SamplingParams(seed=42)] * n, outputs=[[0] * s for s in range(n)])
    out = Sampler()(x, m, np.random.default_rng(0))
    assert_matches_distribution(np.array(out.token_ids), softmax64(logits), n)


# ---- seeds: reproducible whatever the batch --------------------------------------------------------
def test_seeded_rows_reproduce_across_runs_positions_and_neighbors():
    rng = np.random.default_rng(7)
    vocab, n_seeded = 500, 40
    # Rounded to a coarse grid, as bf16 logits are: many exact ties, whose order inside a
    # partition changes with the batch; a seeded row's noise must follow token ids, not positions.
    seeded_logits = (np.round(rng.normal(0, 1.5, size=(n_seeded, vocab)) * 4) / 4).astype(np.float32)
    seeded = [SamplingParams(seed=1000 + i, top_p=[1.0, 0.9][i % 2], top_k=[0, 50][i // 2 % 2],
                             min_p=[0.0, 0.05][i // 4 % 2]) for i in range(n_seeded)]
    steps = [list(range(i % 5)) for i in range(n_seeded)]

    def run(order, n_neighbors, rng_seed):
        neighbors = rng.normal(0, 3, size=(n_neighbors, vocab)).astype(np.float32)
        rows = [("s", i) for i in order] + [("n", j) for j in range(n_neighbors)]
        np.random.default_rng(rng_seed).shuffle(rows)
        x = np.stack([seeded_logits[i] if kind == "s" else neighbors[i] for kind, i in rows])
        # neighbors vary the candidate count m (top-k 200 / top-p-only) and the groups' shapes
        params = [seeded[i] if kind == "s" else
                  SamplingParams(top_p=0.7, top_k=[0, 200, 0][i % 3], temperature=0.5 + i % 3)
                  for kind, i in rows]
        outs = [steps[i] if kind == "s" else [] for kind, i in rows]
        out = Sampler()(x, meta_for(params, outputs=outs), np.random.default_rng(rng_seed))
        return {i: t for (kind, i), t in zip(rows, out.token_ids) if kind == "s"}

    first = run(range(n_seeded), 0, 1)
    assert run(range(n_seeded), 0, 2) == first  # another run, another shared rng
    assert run(range(n_seeded), 30, 3) == first  # shuffled in among random neighbors
    for subset, n_neighbors in [(range(0, n_seeded, 2), 7), (range(0, n_seeded, 2), 0), (range(1, n_seeded, 4), 0)]:
        # other subsets: without top-p-only rows the candidate count m drops from 1024 to 50
        assert run(subset, n_neighbors, 4) == {i: first[i] for i in subset}
    assert len(set(first.values())) > 10  # not trivially constant


def test_a_seed_gives_different_tokens_at_different_steps():
    logits = np.zeros((50, 1000), np.float32)
    m = meta_for([SamplingParams(seed=3)] * 50, outputs=[[0] * s for s in range(50)])
    assert len(set(Sampler()(logits, m, np.random.default_rng(0)).token_ids)) > 45


# ---- logprobs -------------------------------------------------------------------------------------
def test_logprobs_are_log_softmax_of_processed_logits_before_temperature_and_filters():
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 2, size=(3, 200)).astype(np.float32)
    params = [SamplingParams(logprobs=5, temperature=0.3, top_k=3, frequency_penalty=1.0, logit_bias={7: 2.0}),
              SamplingParams(),
              SamplingParams(logprobs=0, temperature=0.0, repetition_penalty=1.5)]
    outputs = [[1, 1, 2], [], [4]]
    meta = meta_for(params, prompts=[[9], [], [5]], outputs=outputs)
    out = Sampler()(logits, meta, np.random.default_rng(0))
    assert out.logprobs[1] is None
    processed = Sampler.process_logits(logits, meta)
    for i, k in [(0, 5), (2, 0)]:
        row = out.logprobs[i]
        ref = log_softmax64(processed[i])
        assert row.token_id == out.token_ids[i]
        assert row.logprob == pytest.approx(ref[row.token_id], abs=1e-5)
        assert row.rank == 1 + int((ref > ref[row.token_id]).sum())
        want = np.argsort(-ref)[:k]
        assert row.top_ids == want.tolist()
        np.testing.assert_allclose(row.top_logprobs, ref[want], atol=1e-5)
        assert row.top_logprobs == sorted(row.top_logprobs, reverse=True)
    assert out.logprobs[2].rank == 1  # greedy picks the best processed token


def test_to_logprob_dicts_puts_chosen_first_and_gives_top_k_ranks():
    logits = np.array([[0.0, 3.0, 1.0, 2.0]], np.float32)
    out = Sampler()(logits, meta_for([SamplingParams(temperature=0.0, logprobs=2)]), np.random.default_rng(0))
    (d0,) = to_logprob_dicts(out.logprobs)
    assert list(d0) == [1, 3] and [v.rank for v in d0.values()] == [1, 2]  # chosen is in the top-k
    # chosen outside the top-k: its own entry first with its rank, then the top-k
    row = LogprobsRow(token_id=5, logprob=-4.0, rank=4, top_ids=[1, 3], top_logprobs=[-0.5, -1.0])
    (d,) = to_logprob_dicts([row])
    assert list(d) == [5, 1, 3]
    assert d[5] == Logprob(-4.0, 4) and d[1] == Logprob(-0.5, 1) and d[3] == Logprob(-1.0, 2)
    assert to_logprob_dicts([None]) == [None]


def test_compute_prompt_logprobs_uses_raw_logits():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(4, 30)).astype(np.float32)
    nxt = [3, 17, 0, 29]
    dicts = compute_prompt_logprobs(logits, nxt, 2)
    for pos, d in enumerate(dicts):
        ref = log_softmax64(logits[pos])
        assert isinstance(d[nxt[pos]], Logprob)
        assert d[nxt[pos]].logprob == pytest.approx(ref[nxt[pos]], abs=1e-5)
        top = np.argsort(-ref)[:2].tolist()
        assert list(d) == [nxt[pos]] + [t for t in top if t != nxt[pos]]  # chosen first, then top-k
        assert all(d[t].rank == r + 1 for r, t in enumerate(top))
        if nxt[pos] not in top:
            assert d[nxt[pos]].rank == 1 + int((ref > ref[nxt[pos]]).sum())
    assert compute_prompt_logprobs(logits[:0], [], 2) == []


# ---- metadata flags -------------------------------------------------------------------------------
def test_metadata_flags_let_common_cases_skip_work():
    m = meta_for([SamplingParams(temperature=0.0, top_k=5), SamplingParams(temperature=0.0)])
    assert m.all_greedy and m.no_penalties and m.no_top_k_top_p and m.max_num_logprobs is None
    assert not m.needs_logit_processing
    m = meta_for([SamplingParams(top_p=0.5, seed=1, logprobs=3), SamplingParams(logprobs=1, presence_penalty=1.0)])
    assert m.all_random and not m.no_top_k_top_p and m.any_seeded and m.max_num_logprobs == 3
    assert not m.no_penalties and m.needs_logit_processing
    with pytest.raises(ValueError):
        SamplingMetadata(temperature=[1.0], top_p=[], top_k=[], min_p=[], presence_penalty=[],
                         frequency_penalty=[], repetition_penalty=[], logit_bias=[], seeds=[],
                         output_token_ids=[], prompt_token_ids=[], suppress_token_ids=[], num_logprobs=[])
    rows = [(SamplingParams(), [1], [], None)] * 2
    assert SamplingMetadata.from_requests(rows, ["a", "b"]).request_ids == ["a", "b"]
    assert SamplingMetadata.from_requests(rows).request_ids is None
    with pytest.raises(ValueError):  # the GPU sampler keys its penalty state by these: one per row
        SamplingMetadata.from_requests(rows, ["a"])


def _flags_per_row(m: SamplingMetadata) -> tuple:
    """The flags by their definitions, row by row (the metadata computes them over distinct values)."""
    greedy = [t < 1e-5 for t in m.temperature]
    rand = [i for i in range(m.num_rows) if not greedy[i]]
    wanted = [k for k in m.num_logprobs if k is not None]
    return (all(greedy), not any(greedy),
            all(m.presence_penalty[i] == 0 and m.frequency_penalty[i] == 0 and m.repetition_penalty[i] == 1
                for i in range(m.num_rows)),
            all(m.top_k[i] <= 0 and m.top_p[i] >= 1 for i in rand), all(m.min_p[i] <= 0 for i in rand),
            any(m.seeds[i] is not None for i in rand), max(wanted) if wanted else None)


@pytest.mark.parametrize("change", [
    dict(temperature=0.0), dict(top_p=0.5), dict(top_k=3), dict(min_p=0.1), dict(presence_penalty=0.5),
    dict(frequency_penalty=-0.5), dict(repetition_penalty=1.2), dict(seed=4), dict(logprobs=2),
    dict(min_tokens=3, stop_token_ids=[7]), dict(logit_bias={1: 2.0})])
@pytest.mark.parametrize("base", [dict(), dict(temperature=0.0), dict(top_k=5, seed=1, logprobs=1)])
def test_metadata_sees_one_row_that_differs(base, change):
    """Rows that share params take a fast path (one row stands for all): the last row alone differing,
    in a params object of its own or an equal copy of the others', must still show in the flags."""
    shared = SamplingParams(max_tokens=8, **base)
    for last in (SamplingParams(max_tokens=8, **{**base, **change}), shared.clone()):
        m = meta_for([shared] * 3 + [last], outputs=[[4]] * 4, eos=[2] * 4)
        assert (m.all_greedy, m.all_random, m.no_penalties, m.no_top_k_top_p, m.no_min_p, m.any_seeded,
                m.max_num_logprobs) == _flags_per_row(m)
        assert m.penalized_rows == [i for i in range(4) if m.presence_penalty[i] != 0 or m.frequency_penalty[i] != 0
                                    or m.repetition_penalty[i] != 1]
        assert m.temperature[3] == float(last.temperature) and m.seeds[3] == last.seed
        assert m.logit_bias[3] == (last.logit_bias or None)
        assert m.suppress_token_ids == [[], [], [], [7, 2] if last.min_tokens else []]


def test_allowed_token_masks_restrict_the_choice():
    logits = np.array([[5.0, 0.0, 1.0, 0.0]] * 2, np.float32)
    meta = meta_for([SamplingParams(temperature=0.0), SamplingParams()])
    meta.allowed_token_masks = [np.array([False, True, True, False]), None]
    out = Sampler()(logits, meta, np.random.default_rng(0))
    assert out.token_ids[0] == 2


# ---- SamplingParams validation --------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "hot"), ("top_p", 0.0), ("top_p", 1.01), ("top_p", None), ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5), ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("max_tokens", 0), ("max_tokens", 2.0), ("min_tokens", -1),
    ("logprobs", -1), ("prompt_logprobs", -1), ("seed", 1.5), ("stop", [""]), ("stop", [3]),
    ("logit_bias", {1: 101.0}), ("logit_bias", {1: -100.5}), ("logit_bias", {"x": 1.0}),
    ("stop_token_ids", ["eos"]),
])
def test_each_out_of_range_field_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_min_tokens_above_max_tokens_is_rejected_and_unknown_fields_too():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(best_of=2)


def test_valid_edge_values_are_accepted_and_normalized():
    sp = SamplingParams(top_k=-1, stop="###", logit_bias={"50256": -100}, stop_token_ids=[2.0],
                        repetition_penalty=2.5, temperature=0, top_p=1, max_tokens=None)
    assert sp.top_k == 0 and sp.stop == ["###"] and sp.logit_bias == {50256: -100.0}
    assert sp.stop_token_ids == [2] and sp.greedy


def test_generation_config_defaults_fill_only_unset_fields():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 3, "repetition_penalty": 1.1}
    sp = SamplingParams(temperature=0.2, top_k=-1).with_generation_defaults(defaults)
    assert (sp.temperature, sp.top_k) == (0.2, 0)  # set by the caller: kept (top_k=-1 is explicit "off")
    assert (sp.top_p, sp.repetition_penalty) == (0.9, 1.1)  # unset: filled
    assert sp.max_tokens == 16  # not a generation-config field
    assert SamplingParams().with_generation_defaults({"top_k": -1}).top_k == 0
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams().with_generation_defaults({"top_p": 0.0})


def test_clone_validates_and_marks_changed_fields_as_set():
    sp = SamplingParams(n=2, seed=5)
    child = sp.clone(n=1, seed=6, temperature=0.3)
    assert (child.n, child.seed, child.temperature, sp.n) == (1, 6, 0.3, 2)
    assert child.with_generation_defaults({"temperature": 0.9, "top_p": 0.5}).temperature == 0.3
    with pytest.raises(ValueError, match="temperature"):
        sp.clone(temperature=-1.0)
    with pytest.raises(ValueError, match="colour"):
        sp.clone(colour=1)


def test_inverse_cdf_draws_across_chunk_boundaries():
    """The two-level inverse-CDF draw (chunks of 256 tokens): frequencies match the probabilities,
    zero-probability tokens are never drawn, and a ragged last chunk works."""
    from rvllm.sampling.sampler import _inverse_cdf

    vocab = 256 * 3 + 17
    probs = np.zeros((2, vocab), np.float32)
    hot = [0, 255, 256, 511, 700, vocab - 1]
    probs[:, hot] = [0.1, 0.2, 0.05, 0.15, 0.3, 0.2]
    rng = np.random.default_rng(7)
    draws = np.concatenate([_inverse_cdf(probs * 5.0, rng) for _ in range(10000)])  # unnormalized is fine
    counts = np.bincount(draws, minlength=vocab)
    assert set(np.flatnonzero(counts)) <= set(hot)
    expected = probs[0, hot] * len(draws)
    chi2 = float(((counts[hot] - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 5 degrees of freedom, alpha = 1e-3
