"""bench/kernel_timeline.py's step cutting and accounting, on a hand-made trace (no GPU, no PyTorch)."""
from bench.kernel_timeline import cut_steps, report, run_summary, sequence, short_name, union_length


def _kernel(name, ts, dur):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}


def _d2h(ts, dur=1.0):
    return {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": ts, "dur": dur}


# A prompt step (first kernel at 0, its copy ends at 21), then two decode steps ending at 51 and 81.
# The host-to-device copy and the kernels are listed out of order, as a trace may have them.
EVENTS = [
    _d2h(50), _kernel("gemv_m1(float*)", 55, 10),
    {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 22, "dur": 2},
    _kernel("embedding_kernel", 0, 4), _kernel("paged_attention_prefill_kernel", 5, 10), _d2h(20),
    _kernel("gemv_m1(float*)", 25, 10), _kernel("attn<128>", 30, 10),  # overlaps the gemv by 5
    _d2h(80), _kernel("attn<128>", 65, 5),
]


def test_steps_are_cut_at_the_sampled_ids_copies():
    decode = cut_steps(EVENTS)
    assert [(lo, hi) for lo, hi, _ in decode] == [(21, 51), (51, 81)]
    assert [[k["name"] for k in ks] for _, _, ks in decode] == [["gemv_m1(float*)", "attn<128>"],
                                                              ["gemv_m1(float*)", "attn<128>"]]
    prompt = cut_steps(EVENTS, prompt=True)
    assert [(lo, hi) for lo, hi, _ in prompt] == [(0, 21)]  # the first step starts at the first kernel
    assert [k["name"] for k in prompt[0][2]] == ["embedding_kernel", "paged_attention_prefill_kernel"]


def test_union_counts_overlapping_kernels_once():
    assert union_length([(25, 35), (30, 40)]) == 15
    assert union_length([(0, 4), (5, 15), (6, 7)]) == 14
    assert union_length([]) == 0


def test_report_per_step_numbers():
    text = report(cut_steps(EVENTS), top=5)
    first = text.splitlines()[0]
    # periods 30 and 30; busy 15 and 15 (the first step's two kernels overlap by 5)
    assert first == "2 decode steps: period median 30.0 us, kernels busy median 15.0 us, idle median 15.0 us"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # what each adds to the chain: the gemv its duration (the step's first kernel); attn 5 in both
    # steps (30-40 after the gemv's end at 35; 65-70 after 65)
    assert rows["gemv_m1"] == "| gemv_m1 | 10.0 | 1.0 | 10.00 | 10.00 |"
    assert rows["attn"] == "| attn | 7.5 | 1.0 | 7.50 | 5.00 |"
    assert rows["sum of kernel times"] == "| sum of kernel times | 17.5 | 2.0 | | |"


def test_short_names_drop_templates_and_parameters():
    assert short_name("void cublasLt::splitKreduce_kernel<float>(int)") == "void cublasLt::splitKreduce_kernel"
    assert short_name("x" * 60) == "x" * 48


def test_sequence_shows_starts_durations_and_what_each_kernel_adds():
    steps = cut_steps(EVENTS)
    text = sequence(steps, 0, 2)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    # step 1: gemv 25-35, attn 30-40 (started 5 before the gemv ended, adds 5);
    # step 2: gemv 55-65, attn 65-70 (starts at the gemv's end, adds 5). Medians of the two.
    assert rows == ["| 0 | gemv_m1 | 0.00 | 10.00 | 10.00 |", "| 1 | attn | -2.50 | 7.50 | 5.00 |"]
    assert sequence(steps, 1, 5) == "no step has 6 kernels"


def test_run_summary_names_the_longest_steps_and_where_the_longest_waited():
    lines = run_summary(EVENTS).splitlines()
    # 81 us from the first kernel to the last copy; kernels busy 4 + 10 + 15 + 15 = 44 us
    assert lines[0] == ("run: 0.1 ms from the first kernel to the last copy, kernels busy 0.0 ms; "
                        "1 prompt steps 0.0 ms, 2 decode steps 0.1 ms")
    # periods 21 (prompt, busy 14), 30 and 30 (busy 15 each); ties keep step order
    assert lines[1] == ("longest steps (# in order, kind, period us, kernels busy us, kernels): "
                        "1 decode 30 15 2; 2 decode 30 15 2; 0 prompt 21 14 2")
    # step 1 (21-51): gemv from 25, attn from 30 (5 before the gemv's end), attn ends at 40
    assert lines[2] == ("its widest gaps (us, after -> before): 11 attn -> (the copy that ends the step); "
                        "4 (the step's start) -> gemv_m1; -5 gemv_m1 -> attn")
    assert run_summary([]) == "no kernels"
