"""Each benchmark read from a small file written in its published schema (column names, types, image encoding and
answer conventions as distributed); every row's kind, options, answer, image and group are checked.

Schema sources (the dataset cards' `dataset_info.features`, or the code that writes/reads the files):
- MMStar: huggingface.co/datasets/Lin-Chen/MMStar, lmms-lab mirror (index, question with "Options: A: ..",
  image, answer letter, category, l2_category)
- MMBench: huggingface.co/datasets/lmms-lab/MMBench (config en/cn) and lmms-lab/MMBench_EN README (index int64,
  question, hint, A, B, C, D, answer, category, image: image, source, l2-category, comment, split; missing options
  and hints stored as the string "nan"); huggingface.co/datasets/HuggingFaceM4/MMBench README (the same columns,
  image: string = base64)
- VLMEvalKit TSV: VLMEvalKit vlmeval/smp/file.py dump() (pandas to_csv(sep='\t', quoting=csv.QUOTE_ALL)) and
  load() (pandas read_csv(sep='\t')); MMBench TSVs refer to a repeated image by the index of the row holding it
- MMMU: huggingface.co/datasets/lmms-lab/MMMU, HuggingFaceM4/MMMU README (id, question with <image n> tags,
  options: string of a Python list, explanation, image_1..image_7: image, img_type, answer, topic_difficulty,
  question_type multiple-choice|open, subfield)
- MME: huggingface.co/datasets/lmms-lab/MME (question_id = image path, image, question ending "Please answer yes
  or no.", answer Yes/No, category; two questions per image)
- GQA: huggingface.co/datasets/lmms-lab/GQA, configs testdev_balanced_instructions (id, imageId, question, answer,
  fullAnswer, isBalanced, ...) and testdev_balanced_images (id, image); lmms-eval tasks/gqa/utils.py joins
  doc["imageId"] to the image table's id
- SEED-Bench-2-Plus: huggingface.co/datasets/AILab-CVC/SEED-Bench-2-Plus mirror card (data_id, question_id,
  question_image_type, question_image_subtype, question, choice_A..choice_D, answer, data_source, data_type, level,
  subpart, version, image)
- SEED-Bench: huggingface.co/datasets/lmms-lab/SEED-Bench (answer, choice_a..choice_d, data_id, data_type
  image|video, question, question_id, question_type_id, image: sequence of image)
- RealWorldQA: huggingface.co/datasets/lmms-lab/RealWorldQA (image, question with "A. ..." option lines or a
  number question, answer)
- POPE: huggingface.co/datasets/lmms-lab/POPE (id, question_id, question, answer yes/no, image_source, image,
  category adversarial|popular|random), parquet parts data/test-0000k-of-00003.parquet
- MM-Vet: huggingface.co/datasets/lmms-lab/MMVet (question_id, image, question, answer with <AND>/<OR>,
  image_source, capability); LLaVA-Bench: lmms-lab/llava-bench-in-the-wild (question_id, question, image, caption,
  gpt_answer, category, image_id)
- MMVP: huggingface.co/datasets/lmms-lab-eval/MMVP README (Index int32, Question, Options "(a) .. (b) ..",
  Correct Answer "(a)", image); questions 2k-1 and 2k form a pair
- ScienceQA-IMG: huggingface.co/datasets/lmms-lab/ScienceQA config ScienceQA-IMG (image, question, choices list,
  answer int index, hint, task, grade, subject, topic, category, skill, lecture, solution)
"""

import base64
import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardmerge.engine.probe import fixtures, prompting, readers

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image() feature in Parquet


def _img(seed):
    return {"bytes": fixtures.png_bytes(seed, (16, 16)), "path": f"{seed}.png"}


def _write(path, columns, types=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    types = types or {}
    pq.write_table(pa.table({k: pa.array(v, type=types.get(k)) for k, v in columns.items()}), path)
    return path


def _read(path):
    samples, bad = [], []
    for shard in readers.plan_shards([path], rows_per_shard=2):
        res = readers.read_shard(shard)
        samples += res.samples
        bad += res.bad
    return samples, {b["row"]: b["reason"] for b in bad}


def _view(s):
    return (prompting.question_kind(s), s.options, s.answer, s.group)


def test_mmstar(tmp_path):
    p = _write(
        tmp_path / "MMStar.parquet",
        {
            "index": [0, 1],
            "question": [
                "Which colour is it?\nOptions: A: red, B: green, C: blue, D: white",
                "What is shown?\nOptions: A: a cat, B: a dog",
            ],
            "image": [_img(0), _img(1)],
            "answer": ["C", "A"],
            "category": ["coarse perception"] * 2,
            "l2_category": ["image style"] * 2,
        },
        {"image": IMAGE},
    )
    samples, bad = _read(p)
    assert not bad and [_view(s) for s in samples] == [("choice", (), "C", "0"), ("choice", (), "A", "1")]
    assert [s.n_choices for s in samples] == [4, 2] and samples[0].image == _img(0)["bytes"]


def _mmbench_columns():
    return {
        "index": [7, 8, 1000007],
        "question": ["Which one?", "What is it?", "Which one?"],
        "hint": ["nan", "Look at the left.", "nan"],
        "A": ["x", "cat", "y"],
        "B": ["y", "dog", "x"],
        "C": ["nan", "cow", "nan"],
        "D": ["nan", "nan", "nan"],
        "answer": ["A", "C", "B"],
        "category": ["attr"] * 3,
        "source": ["s"] * 3,
        "l2-category": ["l2"] * 3,
        "comment": ["nan"] * 3,
        "split": ["dev"] * 3,
    }


def test_mmbench_lmms_lab_parquet_nan_strings_are_missing(tmp_path):
    cols = dict(_mmbench_columns(), image=[_img(0), _img(1), _img(0)])
    samples, bad = _read(_write(tmp_path / "en" / "dev-00000-of-00001.parquet", cols, {"image": IMAGE}))
    assert not bad and [s.benchmark for s in samples] == ["en"] * 3
    assert [_view(s) for s in samples] == [
        ("choice", ("x", "y"), "A", "7"),
        ("choice", ("cat", "dog", "cow"), "C", "8"),
        ("choice", ("y", "x"), "B", "7"),
    ]  # circular copy: same group
    assert [s.hint for s in samples] == ["", "Look at the left.", ""]
    assert "nan" not in prompting.prompt_text(samples[0])


def test_mmbench_huggingfacem4_base64_string_images(tmp_path):
    b64 = [base64.b64encode(_img(i)["bytes"]).decode() for i in (0, 1, 0)]
    samples, bad = _read(_write(tmp_path / "mmbench.parquet", dict(_mmbench_columns(), image=b64)))
    assert not bad and [s.image for s in samples] == [_img(i)["bytes"] for i in (0, 1, 0)]
    assert [s.options for s in samples][1] == ("cat", "dog", "cow")


def test_option_gap_and_letter_without_options_are_bad_rows(tmp_path):
    cols = _mmbench_columns()
    cols["C"][0], cols["D"][0] = "nan", "z"  # D given, C missing
    p = _write(tmp_path / "gap.parquet", dict(cols, image=[_img(0)] * 3), {"image": IMAGE})
    samples, bad = _read(p)
    assert [s.row for s in samples] == [1, 2] and "option C is missing but D" in bad[0]
    p = _write(
        tmp_path / "noopt.parquet",
        {"question": ["Pick one.", "Name it."], "answer": ["C", "a cat"], "image": [_img(0)] * 2},
        {"image": IMAGE},
    )
    samples, bad = _read(p)
    assert [_view(s)[:3] for s in samples] == [("open", (), "a cat")]
    assert "option letter but the row has no options" in bad[0]


def test_vlmevalkit_tsv_quote_all_multiline_and_image_reference(tmp_path):
    path = tmp_path / "MMBench_DEV_EN.tsv"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"]
    img = base64.b64encode(_img(3)["bytes"]).decode()
    rows = [
        [0, 'Which "word"\nfits?', "", "a\tb", "c", "", "", "B", "x", img, "l2", "dev"],
        [1000000, 'Which "word"\nfits?', "", "c", "a\tb", "", "", "A", "x", "0", "l2", "dev"],
        [2, "Which one?", "nan", "p", "q", "r", "", "C", "y", "@@@", "l2", "dev"],
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)
        w.writerow(header)
        w.writerows(rows)
    samples, bad = _read(path)
    assert [s.row for s in samples] == [0, 1] and "base64" in bad[2]
    assert samples[0].question == 'Which "word"\nfits?' and samples[0].options == ("a\tb", "c")
    assert samples[1].image == samples[0].image == _img(3)["bytes"]
    assert [s.group for s in samples] == ["0", "0"] and [s.answer for s in samples] == ["B", "A"]


def test_tsv_with_a_broken_line_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.tsv"
    path.write_text("index\tquestion\tanswer\timage\n0\tq\tA\n")
    with pytest.raises(ValueError, match="broken.tsv.*CSV quoting"):
        readers.plan_shards([path])


def test_mmmu_options_string_open_questions_and_multi_image_rows(tmp_path):
    cols = {
        "id": ["validation_Art_1", "validation_Art_2", "validation_Math_3"],
        "question": ["<image 1> Which style is this?", "How many sides? <image 1>", "Compare <image 1> and <image 2>"],
        "options": ["['Baroque', 'Gothic', 'Rococo']", "[]", "['same', 'different']"],
        "explanation": ["", "", ""],
        "img_type": ["['Paintings']"] * 3,
        "answer": ["B", "6", "A"],
        "topic_difficulty": ["Easy"] * 3,
        "question_type": ["multiple-choice", "open", "multiple-choice"],
        "subfield": ["Art"] * 3,
    }
    for i in range(1, 8):
        cols[f"image_{i}"] = [_img(0) if i == 1 else None, _img(1) if i == 1 else None, _img(2) if i <= 2 else None]
    samples, bad = _read(_write(tmp_path / "MMMU.parquet", cols, {f"image_{i}": IMAGE for i in range(1, 8)}))
    assert [_view(s)[:3] for s in samples] == [("choice", ("Baroque", "Gothic", "Rococo"), "B"), ("open", (), "6")]
    assert samples[0].question == "Which style is this?" and samples[1].question == "How many sides?"
    assert "2 images (image_1, image_2)" in bad[2]


def test_mme_pairs_share_a_group(tmp_path):
    q = ["Is this a cat? Please answer yes or no.", "Is this a dog? Please answer yes or no."]
    p = _write(
        tmp_path / "MME.parquet",
        {
            "question_id": ["existence/000000006040.jpg"] * 2 + ["code/0020.png"],
            "image": [_img(0), _img(0), _img(1)],
            "question": q + [q[0]],
            "answer": ["Yes", "No", "No"],
            "category": ["existence"] * 3,
        },
        {"image": IMAGE},
    )
    samples, bad = _read(p)
    assert not bad and [_view(s) for s in samples] == [
        ("yesno", (), "Yes", "existence/000000006040.jpg"),
        ("yesno", (), "No", "existence/000000006040.jpg"),
        ("yesno", (), "No", "code/0020.png"),
    ]


def test_gqa_joins_the_image_table(tmp_path):
    _write(
        tmp_path / "GQA" / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
        {"id": ["n161313", "n235859"], "image": [_img(0), _img(1)]},
        {"image": IMAGE},
    )
    q = _write(
        tmp_path / "GQA" / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
        {
            "id": ["201307251", "201640614", "20000001"],
            "imageId": ["n161313", "n235859", "n999"],
            "question": ["Is it a bus?", "What color is the car?", "Where?"],
            "answer": ["no", "red", "left"],
            "fullAnswer": ["No, it is a car.", "The car is red.", "Left."],
            "isBalanced": [True] * 3,
        },
    )
    samples, bad = _read(q.parent)
    assert [_view(s) for s in samples] == [("yesno", (), "no", "n161313"), ("open", (), "red", "n235859")]
    assert [s.image for s in samples] == [_img(0)["bytes"], _img(1)["bytes"]]
    assert "n999" in bad[2] and samples[0].benchmark == "testdev_balanced_instructions"
    lone = _write(tmp_path / "lone" / "q.parquet", {"imageId": ["a"], "question": ["?"], "answer": ["x"]})
    with pytest.raises(ValueError, match="no image table"):
        readers.plan_shards([lone])


def test_seed_bench_2_plus_choice_columns(tmp_path):
    cols = {
        "data_id": ["chart/1.png", "chart/1.png"],
        "question_id": ["0", "1"],
        "question_image_type": ["chart"] * 2,
        "question_image_subtype": ["bar"] * 2,
        "question": ["Which bar is tallest?", "How many bars?"],
        "choice_A": ["a", "1"],
        "choice_B": ["b", "2"],
        "choice_C": ["c", "3"],
        "choice_D": ["d", "4"],
        "answer": ["C", "D"],
        "data_source": ["web"] * 2,
        "data_type": ["Single Image"] * 2,
        "level": ["L1"] * 2,
        "subpart": ["chart"] * 2,
        "version": ["v1"] * 2,
        "image": [_img(0)] * 2,
    }
    samples, bad = _read(_write(tmp_path / "SEED-Bench-2-Plus.parquet", cols, {"image": IMAGE}))
    assert not bad and [_view(s) for s in samples] == [
        ("choice", ("a", "b", "c", "d"), "C", "chart/1.png"),
        ("choice", ("1", "2", "3", "4"), "D", "chart/1.png"),
    ]
    assert "A. a\nB. b\nC. c\nD. d" in prompting.prompt_text(samples[0])


def test_seed_bench_image_lists_and_video_rows(tmp_path):
    cols = {
        "answer": ["B", "A"],
        "choice_a": ["x", "p"],
        "choice_b": ["y", "q"],
        "choice_c": ["z", "r"],
        "choice_d": ["w", "s"],
        "data_id": ["1454426_2591111986", "v/123.mp4"],
        "data_type": ["image", "video"],
        "question": ["What is on the table?", "What happens next?"],
        "question_id": ["101669", "200001"],
        "question_type_id": [1, 10],
        "image": [[_img(0)], [_img(1)] * 8],
    }
    samples, bad = _read(_write(tmp_path / "SEED-Bench.parquet", cols, {"image": pa.list_(IMAGE)}))
    assert [_view(s) for s in samples] == [("choice", ("x", "y", "z", "w"), "B", "1454426_2591111986")]
    assert "8 images" in bad[1]


def test_realworldqa_inline_options_and_number_answers(tmp_path):
    cols = {
        "image": [_img(0), _img(1)],
        "question": [
            "Which way is the road turning?\nA. left\nB. right\nC. straight\nPlease answer directly "
            "with a single letter.",
            "How many cars are there?\nPlease answer directly with a number.",
        ],
        "answer": ["B", "3"],
    }
    samples, bad = _read(_write(tmp_path / "RealWorldQA.parquet", cols, {"image": IMAGE}))
    assert not bad and [(_view(s)[:3], s.n_choices) for s in samples] == [
        (("choice", (), "B"), 3),
        (("open", (), "3"), 0),
    ]


def test_pope_parts_are_one_benchmark_grouped_by_image(tmp_path):
    for k in range(3):
        _write(
            tmp_path / "POPE" / "data" / f"test-0000{k}-of-00003.parquet",
            {
                "id": [str(2 * k), str(2 * k + 1)],
                "question_id": [str(2 * k + 1), str(2 * k + 2)],
                "question": ["Is there a snowboard in the image?"] * 2,
                "answer": ["yes", "no"],
                "image_source": [f"COCO_val2014_00000000{k}"] * 2,
                "image": [_img(k)] * 2,
                "category": [["adversarial", "popular", "random"][k]] * 2,
            },
            {"image": IMAGE},
        )
    samples, bad = _read(tmp_path / "POPE" / "data")
    assert not bad and {s.benchmark for s in samples} == {"POPE"} and [s.row for s in samples] == list(range(6))
    assert [s.group for s in samples] == [f"COCO_val2014_00000000{k}" for k in range(3) for _ in range(2)]
    assert [prompting.gold_label(s) for s in samples] == ["Yes", "No"] * 3
    limited = readers.plan_shards([tmp_path / "POPE" / "data"], limit=3)
    assert sum(s.stop - s.start for s in limited) == 3


def test_mmvet_and_llava_bench_open_answers(tmp_path):
    vet = _write(
        tmp_path / "MMVet.parquet",
        {
            "question_id": ["v1_0", "v1_1"],
            "image": [_img(0), _img(1)],
            "question": ["What is x in the equation?", "What is written?"],
            "answer": ["-1 <AND> -5", "Hello"],
            "image_source": ["a", "b"],
            "capability": ["ocr,math", "ocr"],
        },
        {"image": IMAGE},
    )
    samples, bad = _read(vet)
    assert not bad and [_view(s)[:3] for s in samples] == [("open", (), "-1 <AND> -5"), ("open", (), "Hello")]
    bench = _write(
        tmp_path / "llava-bench.parquet",
        {
            "question_id": [0, 1],
            "question": ["What is the name of this dish?", "Describe it."],
            "image": [_img(0), _img(0)],
            "caption": ["ramen"] * 2,
            "gpt_answer": ["Ramen.", "A bowl of ramen."],
            "category": ["conv", "detail"],
            "image_id": ["001"] * 2,
        },
        {"image": IMAGE},
    )
    samples, bad = _read(bench)
    assert not bad and [_view(s) for s in samples] == [
        ("open", (), "Ramen.", "001"),
        ("open", (), "A bowl of ramen.", "001"),
    ]


def test_mmvp_parenthesised_options_and_pairs(tmp_path):
    cols = {
        "Index": [1, 2, 3],
        "Question": ["Is the door open or closed?"] * 2 + ["Long or short?"],
        "Options": ["(a) Open (b) Closed", "(a) Open (b) Closed", "(a) Long (b) Short"],
        "Correct Answer": ["(a)", "(b)", "(b)"],
        "image": [_img(0), _img(1), _img(2)],
    }
    samples, bad = _read(_write(tmp_path / "MMVP.parquet", cols, {"Index": pa.int32(), "image": IMAGE}))
    assert not bad and [_view(s) for s in samples] == [
        ("choice", ("Open", "Closed"), "A", "pair0"),
        ("choice", ("Open", "Closed"), "B", "pair0"),
        ("choice", ("Long", "Short"), "B", "pair1"),
    ]


def test_scienceqa_img_index_answers_and_null_images(tmp_path):
    cols = {
        "image": [_img(0), None],
        "question": ["Which is a mammal?", "Which is a bird?"],
        "choices": [["frog", "whale"], ["owl", "cat"]],
        "answer": [1, 0],
        "hint": ["", "Look."],
        "task": ["closed choice"] * 2,
        "grade": ["grade2"] * 2,
        "subject": ["natural science"] * 2,
        "topic": ["biology"] * 2,
        "category": ["Classification"] * 2,
        "skill": ["s"] * 2,
        "lecture": ["l"] * 2,
        "solution": ["s"] * 2,
    }
    samples, bad = _read(_write(tmp_path / "ScienceQA-IMG.parquet", cols, {"image": IMAGE, "answer": pa.int64()}))
    assert [_view(s)[:3] for s in samples] == [("choice", ("frog", "whale"), "B")]
    assert "missing image" in bad[1]
