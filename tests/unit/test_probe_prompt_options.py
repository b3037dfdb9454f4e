"""--system-prompt and --min-pixels/--max-pixels: what reaches the model's prompt and image processor."""

import pytest

from shardmerge.engine.probe import fixtures, prompting, readers


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from shardmerge.engine.tiny_models import build_mllm

    root = tmp_path_factory.mktemp("prompt")
    return {f: build_mllm(root / f, f, seed=0, num_layers=2) for f in ("qwen2_5_vl", "llava")}


def _sample(size=(64, 64)):
    return readers.Sample("b", 0, "q0", fixtures.png_bytes(0, size), "Is it red?", answer="yes")


def test_system_prompt_is_a_system_turn_before_the_question(dirs):
    for family, d in dirs.items():
        plain = prompting.Prompter(d).render("Is it red?")
        told = prompting.Prompter(d, system_prompt="You are a careful judge.").render("Is it red?")
        assert "You are a careful judge." not in plain, family
        assert told.index("You are a careful judge.") < told.index("Is it red?"), family


def test_pixel_bounds_change_the_qwen_image_token_count(dirs):
    d = dirs["qwen2_5_vl"]
    n = lambda p: int(p.encode(_sample()).image_mask.sum())
    default = n(prompting.Prompter(d))
    fewer = n(prompting.Prompter(d, max_pixels=32 * 32))
    more = n(prompting.Prompter(d, min_pixels=96 * 96, max_pixels=128 * 128))  # the tiny model caps at 56²
    assert fewer < default < more
    ip = prompting.Prompter(d).image_processor
    f = ip.patch_size * ip.merge_size  # one image token per f x f pixels
    assert fewer * f * f <= 32 * 32 and more * f * f >= 96 * 96
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        prompting.Prompter(d, min_pixels=4096, max_pixels=1024)
    with pytest.raises(ValueError, match="fixed size"):
        prompting.Prompter(dirs["llava"], max_pixels=1024)
