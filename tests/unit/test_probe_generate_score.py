"""--score generate: lmms-eval's prompts and answer extraction per benchmark, and greedy answers under the mask (also
with a reference --masking) on the tiny Qwen2.5-VL / Qwen3-VL / LLaVA models.

The expected strings below are written from lmms-eval's task definitions (tasks/mmstar, seedbench,
seedbench_2_plus, pope, realworldqa: `doc_to_text`, `process_results` and the RealWorldQA filters)."""

import pytest
import torch

from shardmerge.engine.probe import core, extraction, fixtures, generation, prompting, readers, scoring


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _s(bench, question, answer, options=(), n_choices=None):
    n = len(options) if n_choices is None else n_choices
    return readers.Sample(bench, 0, "q", fixtures.png_bytes(0), question, tuple(options), answer, n_choices=n)


MMSTAR_Q = "Which animal is shown?\nOptions: A: cat, B: dog, C: bird, D: fish"


def test_task_recognised_from_the_benchmark_name():
    assert extraction.task_for("MMStar").name == "mmstar"
    assert extraction.task_for("SEED-Bench-2-Plus").name == "seedbench2plus"
    assert extraction.task_for("seed_bench").name == "seedbench"
    assert extraction.task_for("pope_adversarial").name == "pope"
    assert extraction.task_for("RealWorldQA").name == "realworldqa"
    assert extraction.task_for("mmbench_en").name == "default"


def test_lmms_eval_prompts():
    mm = _s("mmstar", MMSTAR_Q, "B", n_choices=4)
    assert (
        extraction.task_for("mmstar").prompt(mm)
        == MMSTAR_Q + "\nAnswer with the option's letter from the given choices directly"
    )
    seed = _s("seedbench", "What is it?", "C", ("a", "b", "c", "d"))
    assert extraction.task_for("seedbench").prompt(seed) == (
        "What is it?\nA. a\nB. b\nC. c\nD. d\nAnswer with the option's letter from the given choices directly."
    )
    pope = _s("pope", " Is there a dog in the image? ", "yes")
    assert extraction.task_for("pope").prompt(pope) == (
        "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    )
    rw = _s("realworldqa", "How many cars?\nA. 2\nB. 3\nPlease answer directly with only the letter.", "B", n_choices=2)
    assert extraction.task_for("realworldqa").prompt(rw) == rw.question


@pytest.mark.parametrize(
    "response,right",
    [
        ("B", True),
        ("b", True),
        ("(B) dog", True),
        ("Option B", True),
        ("The answer is B.", True),
        ("dog", False),
        ("A", False),
        ("(A)", False),
        ("", False),
        ("Answer: B", False),
    ],
)
def test_mmstar_extraction(response, right):
    task = extraction.task_for("mmstar")
    s = _s("mmstar", MMSTAR_Q, "B", n_choices=4)
    assert task.correct(task.extract(response, s), s) is right


def test_seed_extraction_first_character():
    seed, plus = extraction.task_for("seedbench"), extraction.task_for("seedbench2plus")
    s = _s("seedbench", "q", "C", ("a", "b", "c", "d"))
    assert seed.extract(" C. c\n", s) == "C" and seed.correct("C", s)
    assert seed.extract("c", s) == "c" and not seed.correct("c", s)  # SEED-Bench compares case-sensitively
    assert plus.correct(plus.extract("c", s), s)  # SEED-Bench-2-Plus lower-cases both
    assert not seed.correct(seed.extract("The answer is C", s), s)  # first character only


def test_pope_extraction_is_the_whole_answer():
    task = extraction.task_for("pope")
    s = _s("pope", "Is there a dog?", "yes")
    assert task.correct(task.extract(" Yes ", s), s)
    assert not task.correct(task.extract("Yes, there is.", s), s)
    assert not task.correct(task.extract("no", s), s)


def test_realworldqa_filters():
    task = extraction.task_for("realworldqa")
    q = "How many cars are there?\nA. 2\nB. 3\nC. 4\nPlease answer directly with only the letter."
    s = _s("realworldqa", q, "B", n_choices=3)
    assert task.extract("B.", s) == "b" and task.correct("b", s)
    assert task.extract("There are 3 cars.", s) == "b"  # the option text found in the response -> its letter
    assert task.extract("three", s) == "b"  # number word -> digit -> option text
    assert task.extract("C", s) == "c" and not task.correct("c", s)
    open_q = _s("realworldqa", "How many wheels?", "4")
    assert task.correct(task.extract("four", open_q), open_q)


def test_default_rules_by_question_kind():
    task = extraction.task_for("ours")
    mc = _s("ours", "q", "B", ("x", "y"))
    assert task.correct(task.extract("(B) y", mc), mc) and not task.correct(task.extract("A", mc), mc)
    yn = _s("ours", "q", "no")
    assert task.correct(task.extract("No, it is not.", yn), yn)
    op = _s("ours", "q", "red car")
    assert task.correct(task.extract("The red car.", op), op)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from shardmerge.engine.tiny_models import build_mllm

    root = tmp_path_factory.mktemp("gen")
    return {f: build_mllm(root / f, f, seed=5, num_layers=2) for f in ("qwen2_5_vl", "qwen3_vl", "llava")}


def _benchmark_samples():
    rows = fixtures.bench_rows(3)
    img = rows[0]["image"]
    return [
        _s("mmstar", MMSTAR_Q, "B", n_choices=4),
        _s("seedbench", "What is it?", "C", ("a", "b", "c", "d")),
        _s("pope", "Is there a dog?", "yes"),
        readers.Sample("ours", 3, "q3", img, "Name the colour.", (), "w1"),
    ]


@pytest.mark.parametrize("masking", ["clean", "reference-qwen25", "reference-qwen3"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_generate_score_is_the_extracted_masked_greedy_answer(dirs, family, masking):
    prompter = prompting.Prompter(dirs[family])
    model = prompting.load_model(dirs[family], dtype=torch.float32)
    parts = core.install(model)
    path = "fast" if masking == "clean" else "exact"
    settings = scoring.ScoreSettings(path=path, score="generate", masking=masking, max_new_tokens=4)
    for sample in _benchmark_samples():
        task = extraction.task_for(sample.benchmark)
        rows = scoring.score_sample(model, parts, prompter, sample, settings)
        inputs = prompter.encode(sample, text=task.prompt(sample))
        assert rows[0]["seq_len"] == inputs.seq_len  # the lmms-eval prompt reached the model
        for r in rows:
            new = generation.greedy_generate(
                model, inputs, r["cut"], max_new_tokens=4, eos_ids=prompter.eos_ids(), mode=masking
            )
            pred = task.extract(prompter.tokenizer.decode(new, skip_special_tokens=True), sample)
            assert r["pred"] == pred and r["correct"] == task.correct(pred, sample)
        if sample.benchmark == "ours":  # the default prompt: the log-prob columns equal label scoring's
            labels = scoring.score_sample(
                model, parts, prompter, sample, scoring.ScoreSettings(path=path, masking=masking)
            )
            for g, lab in zip(rows, labels):
                assert g["gold_logprob"] == pytest.approx(lab["gold_logprob"], abs=1e-6)
    # a gold equal to the unmasked model's own answer is scored right at cut L
    s = _benchmark_samples()[3]
    inputs = prompter.encode(s)
    answer = prompter.tokenizer.decode(
        generation.greedy_generate(model, inputs, parts.num_layers, max_new_tokens=4, eos_ids=prompter.eos_ids()),
        skip_special_tokens=True,
    )
    if scoring.normalize_answer(answer):
        own = readers.Sample("ours", 3, "q3", s.image, s.question, (), answer)
        rows = scoring.score_sample(model, parts, prompter, own, settings)
        assert rows[-1]["correct"]


def test_reference_masking_needs_the_exact_path():
    with pytest.raises(ValueError, match="exact path"):
        scoring.ScoreSettings(path="fast", masking="reference-qwen25")
    with pytest.raises(ValueError, match="score"):
        scoring.ScoreSettings(score="vote")
    with pytest.raises(ValueError, match="masking"):
        scoring.ScoreSettings(path="exact", masking="flash")


def test_cli_picks_the_exact_path_for_reference_masking():
    from shardmerge.jobs.probe import build_parser, job_from_args

    base = ["--model", "m", "--bench", "b", "--out", "o"]
    job = job_from_args(build_parser().parse_args(base + ["--masking", "reference-qwen3", "--score", "generate"]))
    assert job.worker.score.path == "exact" and job.worker.score.masking == "reference-qwen3"
    assert job.worker.score.score == "generate"
    assert job_from_args(build_parser().parse_args(base)).worker.score.path == "fast"
    with pytest.raises(ValueError, match="exact path"):
        job_from_args(build_parser().parse_args(base + ["--masking", "reference-qwen25", "--path", "fast"]))
