"""The ShowUI, TongUI and Vlaser recipe configs, each shrunk by overrides onto its tiny fixture: real `train.main`
runs on data written here in the upstream layout. The loss must fall, and the run must train what the recipe says
(LoRA targets, scopes, full parts)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoints
import data
import formats
import load
import train
from parity import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CPU = ["--bf16=False", "--num_workers=0", "--warmup_ratio=0"]
QWEN_PIX = ["--min_pixels=6272", "--max_pixels=75264"]  # the ShowUI budget shrunk to 8..96 tokens
FALL = 0.75  # nats: mean of the last two logged losses below the mean of the first two by at least this
TONGUI_LF = ("gui_video,guiact_smartphone_thought,guiact_web_single_thought,guiact_web_multi_thought,"
             "showui-desktop-augmented,showui-web,amex-ele,amex-func,aitw_with_thoughts,miniwob_with_thoughts,"
             "mind2web_with_thoughts,wikihow_v2,baidu_jingyan_train").split(",")


pytestmark = pytest.mark.usefixtures("one_thread", "default_denormals")  # tiny models, train.main runs


def config(name):
    return os.path.join(ROOT, "configs", f"{name}.json")


def losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f)]


def assert_falls(run):
    ls = losses(run)
    first, last = sum(ls[:2]) / 2, sum(ls[-2:]) / 2
    assert last < first - FALL, ls


def trained(run):
    """Names of the tensors the run's last checkpoint holds (what was trained)."""
    folder = os.path.join(run, "checkpoints")
    return set(load_file(os.path.join(folder, sorted(os.listdir(folder))[-1], checkpoints.TRAINABLE)))


def screenshot(path, size, seed):
    Image.new("RGB", size, ((seed * 40) % 256, (seed * 90) % 256, (seed * 150) % 256)).save(path)


# ----------------------------------------------------------------------------------------------------------------------
# ShowUI (Qwen2-VL-2B recipes on qwen2_vl_tiny)

NAMES = ["OK", "Cancel", "Save", "Open", "Close", "Help"]


def test_showui_grounding_recipe(tmp_path):
    root = tmp_path / "ShowUI-desktop"
    os.makedirs(root / "images")
    records = []
    for i in range(8):
        screenshot(root / "images" / f"{i}.png", (280, 168), i)
        els = [dict(instruction=NAMES[(i + j) % 6], data_type="text", point=[0.15 + 0.2 * j, 0.5],
                    bbox=[0.1 + 0.2 * j, 0.4, 0.2 + 0.2 * j, 0.6]) for j in range(4)]
        records.append({"img_url": f"{i}.png", "img_size": [280, 168], "element": els, "element_size": 4})
    os.makedirs(root / "metadata")
    with open(root / "metadata" / "hf_train.json", "w") as f:
        json.dump(records, f)
    run = str(tmp_path / "run")
    cfg = train.load_config(config("showui_grounding"))
    assert (cfg.lora_llm_r, cfg.lora_llm_alpha, cfg.lora_vit_r, cfg.num_turn, cfg.crop_min, cfg.crop_max) == (
        32, 64, 0, 100, 0.5, 1.5)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.lr, cfg.lm_skip_layer) == (256 * 784, 1344 * 784, 1e-4, "[1,28,0]")
    train.main([config("showui_grounding"), "--base=" + os.path.join(FIXTURES, "qwen2_vl_tiny"),
                f"--data_dir={tmp_path}", f"--out={run}", "--max_steps=10", "--lr=3e-3", *CPU, *QWEN_PIX])
    assert_falls(run)
    names = trained(run)
    assert any(".self_attn.q_proj.lora_A" in n for n in names) and any(".mlp.down_proj.lora_B" in n for n in names)
    assert not any(n.startswith("visual.") or "lm_head" in n for n in names)  # LLM only; the tied head unwrapped


def test_showui_navigation_recipe(tmp_path):
    root = tmp_path / "GUI_Course" / "GUIAct"
    os.makedirs(root / "images")
    os.makedirs(root / "metadata")
    actions = {"smartphone": ["tap", "swipe", "enter"], "web-multi": ["click", "scroll", "copy"],
               "web-single": ["click", "input", "hover"]}
    for split, acts in actions.items():
        records = []
        for i in range(4):
            for k in range(3):
                screenshot(root / "images" / f"{split}_{i}_{k}.png", (140, 84), i + k)
            steps = [dict(action_type=a, action_value="down" if a == "scroll" else "text",
                          point=[[0.5, 0.8], [0.5, 0.2]] if a == "swipe" else [0.25 * (j + 1), 0.5])
                     for j, a in enumerate(acts)]
            records.append({"img_url": f"{split}_{i}_2", "task": f"task {i}", "step": steps[2],
                            "step_history": [dict(steps[k], img_url=f"{split}_{i}_{k}") for k in range(2)]})
        with open(root / "metadata" / f"hf_train_{split}.json", "w") as f:
            json.dump(records, f)
    run = str(tmp_path / "run")
    cfg = train.load_config(config("showui_navigation"))
    assert (cfg.num_history, cfg.interleaved_history, cfg.lora_llm_r) == (2, "tttt", 32)
    train.main([config("showui_navigation"), "--base=" + os.path.join(FIXTURES, "qwen2_vl_tiny"),
                f"--data_dir={tmp_path}", f"--out={run}", "--max_steps=10", "--lr=3e-3", *CPU, *QWEN_PIX])
    assert_falls(run)


# ----------------------------------------------------------------------------------------------------------------------
# TongUI (Qwen2.5-VL-3B recipe on qwen2_5_vl_tiny): LLaMA-Factory data under the recipe's 13 dataset names


def tongui_data(folder):
    """dataset_info.json with the recipe's dataset names, two records each; wikihow_v2's are text only."""
    os.makedirs(os.path.join(folder, "images"))
    info = {}
    for d, name in enumerate(TONGUI_LF):
        records = []
        for i in range(2):
            screenshot(os.path.join(folder, "images", f"{d}_{i}.png"), (200, 150), d + i)
            if name == "wikihow_v2":
                records.append({"messages": [{"role": "user", "content": f"How do I do {i}?"},
                                             {"role": "assistant", "content": "Open the menu."}]})
                continue
            records.append({"messages": [{"role": "user", "content": f"<image>Where is {NAMES[i]}?"},
                                         {"role": "assistant", "content": f"[0.{i + 2}, 0.5]"}],
                            "images": [f"images/{d}_{i}.png"]})
        info[name] = {"file_name": f"{name}.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}}
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(records, f)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump(info, f)


TONGUI_SHRINK = ["--global_batch=2", "--micro_batch=1", "--image_max_pixels=20000", "--lr=3e-3", "--lora_dropout=0"]


def test_tongui_recipe(tmp_path):
    folder = str(tmp_path / "data")
    tongui_data(folder)
    run = str(tmp_path / "run")
    cfg = train.load_config(config("tongui_3b"), [f"--data_dir={folder}", "--max_steps=10", *TONGUI_SHRINK])
    # the epoch's first 20 samples (10 steps of 2) hold text-only ones: a text-only micro-batch trains too
    ds = formats.LlamaFactoryDataset(folder, cfg.datasets, load.load_tokenizer(os.path.join(FIXTURES, "qwen2_5_vl_tiny")),
                                  cfg.min_pixels, cfg.max_pixels, cfg.max_length)
    order = train.step_order(len(ds), cfg, ds.lengths, 0)[:20]
    assert len(ds) == 26 and any("images" not in ds.samples[i][2] for i in order)
    train.main([config("tongui_3b"), "--base=" + os.path.join(FIXTURES, "qwen2_5_vl_tiny"), f"--data_dir={folder}",
                f"--out={run}", "--max_steps=10", *TONGUI_SHRINK, *CPU])
    assert_falls(run)
    names = {n.rsplit(".", 1)[0] for n in trained(run)}  # the wrapped layers
    suffixes = {n.split(".", 3)[-1] for n in names}
    assert suffixes == {"self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                        "mlp.down_proj", "attn.proj"}  # no q_proj, no ViT qkv, no merger
    assert any(n.startswith("visual.blocks.") and n.endswith("mlp.gate_proj") for n in names)  # the ViT has LoRA


def test_tongui_text_only_micro_batch_under_fsdp_matches_one_process(tmp_path):
    """2 ranks (FSDP2, gloo): each step one rank gets the image record, the other the text-only one, which runs the
    vision tower on a masked blank image; losses and adapters equal a one-process run of the same global batch."""
    folder = str(tmp_path / "data")
    tongui_data(folder)
    with open(os.path.join(folder, "dataset_info.json")) as f:
        info = json.load(f)
    with open(os.path.join(folder, "mix.json"), "w") as f:  # one image record, one text-only record
        json.dump([json.load(open(os.path.join(folder, "showui-web.json")))[0],
                   json.load(open(os.path.join(folder, "wikihow_v2.json")))[0]], f)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({"mix": dict(info["showui-web"], file_name="mix.json")}, f)
    args = lambda out: [config("tongui_3b"), "--base=" + os.path.join(FIXTURES, "qwen2_5_vl_tiny"),  # noqa: E731
                        f"--data_dir={folder}", "--datasets=['mix']", f"--out={out}", "--max_steps=3",
                        *TONGUI_SHRINK, *CPU]
    train.main(args(str(tmp_path / "one")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *args(str(tmp_path / "two"))], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert max(abs(a - b) / abs(b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    a, b = (load_file(os.path.join(str(tmp_path / r), "checkpoints", "step_0000003", checkpoints.TRAINABLE)) for r in
            ("one", "two"))
    # Adam scales lora_A's first, near-zero gradients to full steps, so reduction-order noise shows there: 1e-3
    assert set(a) == set(b) and max(rel_err(a[k], b[k]) for k in a) <= 1e-3


def test_tongui_config_is_the_recipe():
    cfg = train.load_config(config("tongui_3b"))
    assert cfg.datasets == TONGUI_LF and cfg.data_format == "llamafactory" and cfg.max_samples == 100000
    assert (cfg.lora_llm_r, cfg.lora_llm_alpha, cfg.lora_vit_r, cfg.lora_vit_alpha) == (16, 32, 16, 32)
    assert cfg.lora_dropout == 0
    assert cfg.lora_targets == ["attn.proj", "gate_proj", "k_proj", "v_proj", "up_proj", "down_proj", "o_proj"]
    assert (cfg.image_max_pixels, cfg.min_pixels, cfg.max_pixels) == (1344 * 784, 3136, 12845056)
    assert (cfg.lr, cfg.schedule, cfg.warmup_ratio, cfg.epochs, cfg.global_batch, cfg.max_length) == (
        1e-4, "cosine", 0.1, 3.0, 32, 8192)


# ----------------------------------------------------------------------------------------------------------------------
# Vlaser (InternVL3-2B full SFT on internvl3_tiny)


def test_vlaser_recipe(tmp_path):
    lines = []
    for i in range(8):
        screenshot(tmp_path / f"{i}.png", (120 + 20 * i, 100), i)
        answer = "<point>[[254, 624], [304, 624]]</point>" if i % 2 else "a red block"
        question = "Point to the blocks." if i % 2 else "What is it?"
        lines.append({"image": f"{i}.png", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                             {"from": "gpt", "value": answer}]})
    with open(tmp_path / "v.jsonl", "w") as f:
        f.writelines(json.dumps(l) + "\n" for l in lines)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"v": {"root": str(tmp_path), "annotation": str(tmp_path / "v.jsonl"),
                                      "data_augment": False, "repeat_time": 1}}))
    cfg = train.load_config(config("vlaser_2b"))
    assert (cfg.train_parts, cfg.lora_llm_r, cfg.lr, cfg.max_tiles, cfg.max_length) == (
        ["language_model", "mlp1"], 0, 2e-5, 12, 16384)
    run = str(tmp_path / "run")
    train.main([config("vlaser_2b"), "--base=" + os.path.join(FIXTURES, "internvl3_tiny"), f"--meta={meta}",
                f"--out={run}", "--global_batch=4", "--micro_batch=2", "--max_steps=10", "--max_tiles=2",
                "--lr=1e-3", *CPU])
    assert_falls(run)
    parts = {n.split(".")[0] for n in trained(run)}
    assert parts == {"language_model", "mlp1"}  # the ViT stays frozen


def test_data_format_must_fit_the_model(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        train.main([config("showui_grounding"), "--base=" + os.path.join(FIXTURES, "internvl3_tiny"),
                    f"--out={tmp_path / 'r'}", *CPU])
    with pytest.raises(ValueError, match="data_format = 'csv' is not one of"):
        train.main([config("vlaser_2b"), "--base=" + os.path.join(FIXTURES, "internvl3_tiny"), "--data_format=csv",
                    f"--out={tmp_path / 'r'}", *CPU])
