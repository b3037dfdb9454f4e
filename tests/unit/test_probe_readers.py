"""Benchmark readers (our Parquet, HF Parquet, VLMEvalKit TSV), bad-row accounting, sharding, prompting."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardmerge.engine.probe import fixtures, prompting, readers


def _read_all(path, **kw):
    samples, bad = [], []
    for shard in readers.plan_shards([path], **kw):
        res = readers.read_shard(shard)
        samples += res.samples
        bad += res.bad
    return samples, bad


def _key(s):
    return (s.question, s.options, s.answer, s.category, s.image, s.n_choices)


def test_three_formats_read_the_same_samples(tmp_path):
    rows = fixtures.bench_rows(7)
    files = [
        fixtures.write_ours(tmp_path / "ours.parquet", rows, row_group_size=3),
        fixtures.write_hf(tmp_path / "hf.parquet", rows, row_group_size=2),
        fixtures.write_tsv(tmp_path / "vlm.tsv", rows),
    ]
    formats = [readers.detect_format(f) for f in files]
    assert formats == ["ours", "hf", "tsv"]
    results = [_read_all(f) for f in files]
    for samples, bad in results:
        assert bad == []
        assert [s.row for s in samples] == list(range(7))
    assert [_key(s) for s in results[0][0]] == [_key(s) for s in results[1][0]] == [_key(s) for s in results[2][0]]
    first = results[0][0]
    assert first[0].options == ("red", "green", "blue", "black") and first[0].answer == "A"
    assert first[0].n_choices == 4 and first[1].n_choices == 0 and first[1].answer in ("yes", "no")
    assert [s.id for s in results[1][0]] == [f"q{i}" for i in range(7)]  # HF: question_id column
    assert [s.benchmark for s in results[2][0]] == ["vlm"] * 7


def test_image_paths_relative_to_the_file(tmp_path):
    rows = fixtures.bench_rows(3)
    path = fixtures.write_ours(tmp_path / "b.parquet", rows, image_paths=True)
    samples, bad = _read_all(path)
    assert bad == [] and [s.image for s in samples] == [r["image"] for r in rows]
    (tmp_path / "b_images" / "q1.png").unlink()
    samples, bad = _read_all(path)
    assert [s.id for s in samples] == ["q0", "q2"]
    assert len(bad) == 1 and bad[0]["id"] == "q1" and "not found" in bad[0]["reason"]


def test_bad_rows_are_counted_not_fatal(tmp_path):
    rows = fixtures.bench_rows(8, kinds=("choice",))
    rows[1]["question"] = ""
    rows[2]["image"] = b"not an image"
    rows[3]["answer"] = "Z"
    rows[4]["answer"] = "purple"  # not an option text
    rows[5]["options"] = ["only one"]
    rows[6]["answer"] = "green"  # option text -> letter B
    path = fixtures.write_ours(tmp_path / "b.parquet", rows)
    samples, bad = _read_all(path)
    assert [s.id for s in samples] == ["q0", "q6", "q7"]
    assert samples[1].answer == "B"
    reasons = {b["id"]: b["reason"] for b in bad}
    assert set(reasons) == {"q1", "q2", "q3", "q4", "q5"}
    assert "question" in reasons["q1"] and "decode" in reasons["q2"] and "option" in reasons["q4"]
    assert "1 options" in reasons["q5"]


def test_tsv_bad_base64_and_image_references(tmp_path):
    rows = fixtures.bench_rows(4, kinds=("choice",))
    path = fixtures.write_tsv(tmp_path / "mmb.tsv", rows, hint="look closely")
    lines = path.read_text().splitlines()
    cells = [line.split("\t") for line in lines]
    cells[2][1] = "0"  # row 1 reuses row 0's image (MMBench stores repeats this way)
    cells[3][1] = "@@@not base64@@@"
    path.write_text("\n".join("\t".join(c) for c in cells) + "\n")
    samples, bad = _read_all(path)
    assert [s.row for s in samples] == [0, 1, 3]
    assert samples[1].image == rows[0]["image"] and samples[0].hint == "look closely"
    assert len(bad) == 1 and bad[0]["row"] == 2 and "base64" in bad[0]["reason"]


def test_hf_struct_images_and_embedded_options(tmp_path):
    """MMStar style: options written inside the question, letter answer; POPE style yes/no; a row without image."""
    img = fixtures.png_bytes(1)
    table = pa.table(
        {
            "index": [0, 1, 2],
            "image": [{"bytes": img, "path": None}, {"bytes": img, "path": "x.png"}, None],
            "question": ["Which colour?\nOptions: A: red, B: green, C: blue", "Is there a cat?", "Anything?"],
            "answer": ["c", "Yes", "no"],
        }
    )
    pq.write_table(table, tmp_path / "mmstar.parquet")
    samples, bad = _read_all(tmp_path / "mmstar.parquet")
    assert [s.n_choices for s in samples] == [3, 0] and samples[0].answer == "C"
    assert prompting.question_kind(samples[1]) == "yesno" and prompting.gold_label(samples[1]) == "Yes"
    assert len(bad) == 1 and bad[0]["row"] == 2 and "struct" in bad[0]["reason"]


def test_shards_cover_every_row_once_and_respect_row_groups(tmp_path):
    rows = fixtures.bench_rows(11)
    path = fixtures.write_ours(tmp_path / "b.parquet", rows, row_group_size=4)
    shards = readers.plan_shards([path], rows_per_shard=3)
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 4), (4, 7), (7, 8), (8, 11)]
    assert [s.index for s in shards] == list(range(5))
    covered = [s.row for sh in shards for s in readers.read_shard(sh).samples]
    assert covered == list(range(11))
    limited = readers.plan_shards([path], rows_per_shard=3, limit=5)
    assert [(s.start, s.stop) for s in limited] == [(0, 3), (3, 4), (4, 5)]
    tsv = fixtures.write_tsv(tmp_path / "t.tsv", rows)
    assert [(s.start, s.stop) for s in readers.plan_shards([tsv], rows_per_shard=5)] == [(0, 5), (5, 10), (10, 11)]


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        readers.plan_shards([tmp_path / "missing.parquet"])
    with pytest.raises(ValueError, match="no .parquet or .tsv"):
        readers.plan_shards([tmp_path])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rows = fixtures.bench_rows(2)
    fixtures.write_ours(tmp_path / "a" / "x.parquet", rows)
    fixtures.write_tsv(tmp_path / "b" / "x.tsv", rows)
    with pytest.raises(ValueError, match="share the name"):
        readers.plan_shards([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="format"):
        readers.detect_format(tmp_path / "a" / "x.parquet", "csv")


def test_prompt_text_and_labels():
    s = readers.Sample("b", 0, "q", b"", "What is it?", ("cat", "dog"), "B", hint="a pet", n_choices=2)
    assert prompting.prompt_text(s) == "a pet\nWhat is it?\nA. cat\nB. dog\n" + prompting.CHOICE_SUFFIX
    assert prompting.labels(s) == ("A", "B") and prompting.question_kind(s) == "choice"
    o = readers.Sample("b", 0, "q", b"", "Name it.", (), "a dog")
    assert prompting.question_kind(o) == "open" and prompting.labels(o) == ()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava", "llava_next"])
def test_prompter_builds_inputs_without_torchvision(tmp_path, family):
    """Image tokens expanded to one per visual feature; same ids as the model-dir builder's own encoder."""
    import io

    from PIL import Image

    from shardmerge.engine.tiny_models import build_mllm, mm_inputs

    d = build_mllm(tmp_path / family, family, seed=0)
    prompter = prompting.Prompter(d)
    row = fixtures.bench_rows(1)[0]
    sample = readers.Sample(
        "b", 0, "q0", row["image"], row["question"], tuple(row["options"]), row["answer"], n_choices=4
    )
    inputs = prompter.encode(sample)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompting.prompt_text(sample)}]}]
    ref = mm_inputs(d, chat, [Image.open(io.BytesIO(row["image"])).convert("RGB")])
    assert inputs.input_ids.tolist() == ref["input_ids"].tolist()
    n_img = int(inputs.image_mask.sum())
    if family.startswith("qwen"):
        assert prompter.processor is None  # composite Qwen processor needs torchvision
        assert n_img == int(inputs.model_kwargs["image_grid_thw"].prod()) // 4 > 1
        assert inputs.model_kwargs["mm_token_type_ids"].sum() == n_img
    elif family == "llava":
        assert n_img == 4
    # byte-level tiny tokenizer: " A" is (" ", "A"), so after "ASSISTANT:" the labels fall back to "A".."D"
    assert prompter.label_ids(sample) == tuple(prompter.tokenizer.convert_tokens_to_ids(list("ABCD")))
    assert prompter.eos_ids()
