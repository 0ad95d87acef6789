"""MP-GUI's synthetic fusion-gate data: global descriptions, local descriptions of boxed regions and single-perceiver
QA (SPE-QA) for a folder of screenshots, with the official prompts (pipeline/vllm_pipeline_v2.py, commit 232455c).

    python tools/synth.py screens/ out/ --server http://localhost:8001 --server-model Qwen2-VL-72B-Instruct
    python tools/synth.py screens/ out/ --model tests/fixtures/qwen2_vl_tiny --boxes boxes.json

SCREENS is a folder of screenshots (.png/.jpg/.jpeg/.webp, subfolders included). --boxes names a json
{"relative/path.png": [[x1, y1, x2, y2], ...]} of 0-1000 boxes for the local descriptions (upstream takes them from
an in-house YOLOv8 detector); without it the local task is left out. The teacher is our own model (--model, any
family, batched greedy decoding) or any OpenAI-compatible chat-completions server (--server, --workers requests in
flight, retried with exponential backoff). Every answer is appended to OUT/cache.jsonl keyed by (image, task,
region); a rerun skips the keys it holds, so an interrupted run resumes. Then the cache is converted into
OUT/global_des.jsonl, local_des.jsonl, spe_qa.jsonl and OUT/meta.json (InternVL format).

As upstream: system "You are a helpful assistant.", images downscaled by --scale 0.7, the local box drawn 2 px wide
in blue, SPE-QA as two calls (the QA, then a text-only call that reformats it as JSON, whose outermost [...] is
parsed). Not defined upstream, chosen here: the local-description question and that its training image is the
unmarked screenshot; the JSON is parsed as JSON, else as a Python literal.
"""
import argparse
import ast
import base64
import io
import json
import os
import sys
import time
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from http.client import HTTPException

from PIL import Image, ImageDraw
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.common import Skips, conv, write_jsonl, write_meta  # noqa: E402

SYSTEM = "You are a helpful assistant."
GLOBAL_PROMPT = ("Generate a summary of the screen in one sentence. Do not focus on specifically naming the various UI "
                 "elements, but instead, focus on the content.")
GLOBAL_QUESTION = "Describe this screen."  # upstream's question for the global description
LOCAL_PROMPT = (  # verbatim, the box appended in Qwen2-VL's box syntax
    "Describe this image. You will receive a screenshot of a GUI that includes a bounding box (bbox) with specified "
    "coordinates. Your task is to analyze the content within the bbox and identify the component to which it belongs "
    "by looking for surrounding component boundaries. Please provide a detailed description that includes the "
    "following:\n1. Identify the content inside the bbox (text or graphic element).\n2. Look for the component "
    "boundary surrounding the bbox and describe the overall component it belongs to.\n3. Explain the function of this "
    "component and any other relevant elements it contains.\n4. If there are no surrounding component boundaries, "
    "state that there are no related components nearby.\n**Output Example (response with just one sentence):**\n"
    "\u25cf \"This is an icon of a house, belonging to a button component that describes the home page; it also "
    "includes another house icon as part of this component.\"\n\u25cf \"This is an arrow icon, belonging to the "
    "'General' row within the list, indicating that this is a clickable item in the menu which may goto the 'General' "
    "page.\"\n\u25cf \"This is a standalone button labeled 'Submit', and there are no related components nearby.\""
    "Now the coordinate of bbox i'd like you to analyse is <|box_start|>({},{}),({},{})<|box_end|>")
LOCAL_QUESTION = "Describe the content in the bounding box {} and the component it belongs to."  # ours
QA_PROMPT = (  # verbatim, including the line break and indentation of upstream's triple-quoted string
    "Design some QA pairs based only on the icons in the picture, only on the text in the picture,\n"
    "            only on some relationships between components and only on locations of components (such as the "
    "return icon is in the upper left corner of the screen, etc.), and give questions and correct answers.")
FORMAT_PROMPT = ("Please format the below data as JSON format such as {'question': ..., 'type': 'text' or 'icon' or "
                 "'relationship' or 'location', 'answer': ...}.")
TASKS = {"global": "global_des", "local": "local_des", "qa": "spe_qa"}  # task -> output dataset
EXTS = (".png", ".jpg", ".jpeg", ".webp")


def picture(path, region, scale):
    """The screenshot as the teacher sees it: the region (0-1000) outlined in blue, then downscaled."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    if region:
        x1, y1, x2, y2 = json.loads(region)
        w, h = im.size
        ImageDraw.Draw(im).rectangle([x1 * w // 1000, y1 * h // 1000, x2 * w // 1000, y2 * h // 1000],
                                     outline=(0, 0, 255), width=2)
    if scale != 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    return im


class Server:
    """OpenAI-compatible chat completions, one request per call, retried on connection errors, timeouts, 5xx, 408,
    429 and malformed replies, with delays of backoff * 2^attempt."""

    def __init__(self, url, model, timeout=300.0, max_retries=5, backoff=1.0, max_tokens=None):
        self.url = url if url.rstrip("/").endswith("/chat/completions") else \
            url.rstrip("/") + ("/chat/completions" if url.rstrip("/").endswith("/v1") else "/v1/chat/completions")
        self.model, self.timeout, self.max_retries, self.backoff, self.max_tokens = (model, timeout, max_retries,
                                                                                     backoff, max_tokens)
        self.batch = 1

    def answer(self, prompt, image, what):
        content = [{"type": "text", "text": prompt}]
        if image is not None:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        body = dict(model=self.model, messages=[{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": content}])
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        body = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    text = json.load(r)["choices"][0]["message"]["content"]
                if isinstance(text, str):
                    return text
                error = f"reply content is {text!r}"
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in (408, 429):
                    raise RuntimeError(f"{what}: HTTP {e.code} from {self.url}: {e.read()[:500]!r}") from e
                error = f"HTTP {e.code}"
            except (urllib.error.URLError, HTTPException, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                error = repr(e)  # OSError covers timeouts and dropped connections, ValueError bad JSON
        raise RuntimeError(f"{what}: no answer from {self.url} after {self.max_retries + 1} attempts "
                           f"(last error: {error})")

    def answers(self, items):
        return [self.answer(*it) for it in items]


class OwnModel:
    """Our checkpoint as the teacher: eval.answer_batch, greedy, left-padded batches."""

    def __init__(self, a):
        import eval as E  # torch and the model only for this teacher; a server teacher needs neither
        import load
        self.E, self.batch = E, a.batch_size
        self.m = load.load_model(a.model, dtype=E.DTYPES[a.dtype], device=a.device)
        self.tok = load.load_tokenizer(self.m.folder)
        self.opts = types.SimpleNamespace(max_tiles=a.max_tiles, system=a.system, min_pixels=a.min_pixels,
                                          max_pixels=a.max_pixels, max_new_tokens=a.max_new_tokens or 256)

    def answers(self, items):
        import torch
        if not items:
            return []
        with torch.inference_mode():
            return self.E.answer_batch(self.m, self.tok, [(p, [im] if im else [], None) for p, im, _ in items],
                                       self.opts)[0]


def run_jobs(teacher, jobs, screens, scale):
    """Cache records for a batch of jobs: the image-bearing call for all, then SPE-QA's text-only reformatting."""
    what = [f"{j['image']} task {j['task']}" + (f" region {j['region']}" if j["region"] else "") for j in jobs]
    items = []
    for j, w in zip(jobs, what):
        x1y1x2y2 = json.loads(j["region"]) if j["region"] else None
        prompt = {"global": GLOBAL_PROMPT, "qa": QA_PROMPT}.get(j["task"]) or LOCAL_PROMPT.format(*x1y1x2y2)
        items.append((prompt, picture(os.path.join(screens, j["image"]), j["region"], scale), w))
    first = teacher.answers(items)
    qa = [i for i, j in enumerate(jobs) if j["task"] == "qa"]  # a "<image>" in a reply is not an image
    second = teacher.answers([(FORMAT_PROMPT + first[i].replace("<image>", ""), None, what[i]) for i in qa])
    out = [dict(j, response=r) for j, r in zip(jobs, first)]
    for i, r in zip(qa, second):
        out[i]["formatted"] = r
    return out


def key(r):
    return (r["image"], r["task"], r["region"])


def load_cache(path, skips):
    """{key: record}; a torn last line (a killed write) is cut off so appends start on a fresh line."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as f:
        raw = f.read()
        if raw and not raw.endswith(b"\n"):
            f.truncate(raw.rfind(b"\n") + 1)
            skips("torn cache line", f"{path}: cut an unfinished last line")
            raw = raw[:raw.rfind(b"\n") + 1]
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        try:
            r = json.loads(line)
            k = key(r)
        except (ValueError, KeyError, TypeError) as e:
            skips("bad cache line", f"{path} line {n}: {e}")
            continue
        if k in done:
            skips("duplicate cache key", f"{path} line {n}: {k}")
        done.setdefault(k, r)
    return done


def parse_pairs(text):
    """SPE-QA pairs from the reformatting reply: its outermost [...] as JSON, else as a Python literal."""
    start, end = text.find("["), text.rfind("]")
    if start == -1 or end <= start:
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            pairs = parse(text[start:end + 1])
            return pairs if isinstance(pairs, list) else None
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return None


def convert(done, screens, skips):
    """{task: [InternVL jsonl records]} from the cache, in (image, region) order."""
    rows, sizes = {t: [] for t in TASKS}, {}
    for r in sorted(done.values(), key=lambda r: (list(TASKS).index(r["task"]), r["image"], r["region"])):
        where = f"{r['image']} task {r['task']}" + (f" region {r['region']}" if r["region"] else "")
        if r["image"] not in sizes:
            try:
                with Image.open(os.path.join(screens, r["image"])) as im:
                    sizes[r["image"]] = im.size
            except OSError as e:
                sizes[r["image"]] = None
                skips("cached answer for an unreadable screenshot", f"{where}: {e}")
        if sizes[r["image"]] is None:
            continue
        base = dict(image=r["image"], width=sizes[r["image"]][0], height=sizes[r["image"]][1])
        answer = r["response"].strip()
        if r["task"] == "global" and answer:
            rows["global"].append(dict(base, conversations=conv(GLOBAL_QUESTION, answer)))
        elif r["task"] == "local" and answer:
            box = "[[{}, {}, {}, {}]]".format(*json.loads(r["region"]))
            rows["local"].append(dict(base, region=r["region"], conversations=conv(LOCAL_QUESTION.format(box), answer)))
        elif r["task"] == "qa":
            pairs = parse_pairs(r.get("formatted", ""))
            if pairs is None:
                skips("SPE-QA reply without a JSON list", where)
                continue
            for k, p in enumerate(pairs):
                q, ans = (p.get("question"), p.get("answer")) if isinstance(p, dict) else (None, None)
                if not isinstance(q, str) or not q.strip() or not isinstance(ans, (str, int, float)) or \
                        not str(ans).strip():
                    skips("SPE-QA pair without question or answer", f"{where} pair {k}: {p!r:.200}")
                    continue
                rows["qa"].append(dict(base, type=str(p.get("type", "")),
                                       conversations=conv(q.strip(), str(ans).strip())))
        else:
            skips("empty answer", where)
    for t in rows:
        rows[t] = [dict(r, id=i) for i, r in enumerate(rows[t])]
    return rows


def plan(screens, tasks, boxes, skips):
    """Every job, task by task as upstream: (image, task, region) with region "[x1,y1,x2,y2]" (0-1000) or ""."""
    images = sorted(os.path.relpath(os.path.join(d, f), screens).replace(os.sep, "/")
                    for d, _, fs in os.walk(screens) for f in fs if f.lower().endswith(EXTS))
    if not images:
        raise FileNotFoundError(f"no screenshots ({', '.join(EXTS)}) under {screens}")
    jobs = []
    for task in tasks:
        for im in images:
            regions = [""]
            if task == "local":
                regions = []
                for k, b in enumerate(boxes.get(im, [])):
                    if not (isinstance(b, list) and len(b) == 4 and all(type(v) is int for v in b)
                            and 0 <= b[0] < b[2] <= 1000 and 0 <= b[1] < b[3] <= 1000):
                        raise ValueError(f"boxes for {im}, box {k}: expected [x1, y1, x2, y2] integers with "
                                         f"0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000, got {b!r}")
                    r = "[{},{},{},{}]".format(*b)
                    if r not in regions:
                        regions.append(r)
            jobs += [dict(image=im, task=task, region=r) for r in regions]
    for im in sorted(set(boxes) - set(images)):
        skips("boxes for a missing screenshot", im)
    return jobs


def run(a):
    skips = Skips()
    tasks = a.tasks or (["global", "local", "qa"] if a.boxes else ["global", "qa"])
    if "local" in tasks and not a.boxes:
        raise SystemExit("the local task needs --boxes")
    boxes = json.load(open(a.boxes, encoding="utf-8")) if a.boxes else {}
    if not isinstance(boxes, dict):
        raise ValueError(f"{a.boxes}: expected an object {{image: [[x1, y1, x2, y2], ...]}}")
    jobs = plan(a.screens, tasks, boxes, skips)
    os.makedirs(a.out, exist_ok=True)
    cache_path = os.path.join(a.out, "cache.jsonl")
    done = load_cache(cache_path, skips)
    todo = [j for j in jobs if key(j) not in done][:a.limit or None]
    print(f"synth: {len(jobs)} jobs, {len(jobs) - sum(key(j) not in done for j in jobs)} cached, {len(todo)} to run")
    failures = []
    if todo:
        teacher = OwnModel(a) if a.model else Server(a.server, a.server_model, a.timeout, a.max_retries, a.backoff,
                                                     a.max_new_tokens)
        chunks = [todo[i:i + teacher.batch] for i in range(0, len(todo), teacher.batch)]
        pool = ThreadPoolExecutor(a.workers if a.server else 1)
        try:
            with open(cache_path, "a", encoding="utf-8") as cache, tqdm(total=len(todo), desc="synth") as bar:
                futures = {pool.submit(run_jobs, teacher, c, a.screens, a.scale): c for c in chunks}
                for fut in as_completed(futures):
                    try:
                        for r in fut.result():
                            cache.write(json.dumps(r, ensure_ascii=False) + "\n")
                            cache.flush()  # whole lines, one per answer: a kill tears at most the last one
                            done[key(r)] = r
                    except Exception as e:  # noqa: BLE001 -- reported below, the rest of the run goes on
                        failures.append(str(e))
                        tqdm.write(f"failed: {e}", file=sys.stderr)
                    bar.update(len(futures[fut]))
        finally:  # on Ctrl-C, drop the queued jobs instead of running them all first
            pool.shutdown(wait=True, cancel_futures=True)
    rows = convert(done, a.screens, skips)
    files = {}
    for task, records in rows.items():
        if task in tasks:
            files[TASKS[task]] = os.path.join(a.out, TASKS[task] + ".jsonl")
            write_jsonl(files[TASKS[task]], records)
    write_meta(os.path.join(a.out, "meta.json"), files, os.path.abspath(a.screens))
    print(f"synth: {', '.join(f'{TASKS[t]} {len(r)}' for t, r in rows.items() if t in tasks)} samples; "
          f"skipped: {skips.summary()}")
    if failures:
        raise RuntimeError(f"{len(failures)} job(s) failed (their keys stay undone; rerun to retry): "
                           + "; ".join(failures[:5]))
    return rows, skips


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("screens", help="folder of screenshots")
    p.add_argument("out", help="output folder (cache.jsonl, *.jsonl, meta.json)")
    teacher = p.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--model", help="our checkpoint folder or hub id (any family)")
    teacher.add_argument("--server", help="chat-completions URL (base, /v1 or the full endpoint)")
    p.add_argument("--server-model", help="model name the server serves (with --server)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), help="default: global qa, and local with --boxes")
    p.add_argument("--boxes", help="json {image: [[x1, y1, x2, y2], ...]} of 0-1000 boxes for the local task")
    p.add_argument("--scale", type=float, default=0.7, help="downscale factor of the screenshots (official 0.7)")
    p.add_argument("--limit", type=int, default=0, help="run at most N new jobs (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer cap (model default 256; server: unset)")
    p.add_argument("--workers", type=int, default=8, help="--server: requests in flight")
    p.add_argument("--timeout", type=float, default=300.0, help="--server: seconds per request")
    p.add_argument("--max-retries", type=int, default=5, help="--server: retries per request")
    p.add_argument("--backoff", type=float, default=1.0, help="--server: first retry delay in s, doubling")
    p.add_argument("--batch-size", type=int, default=8, help="--model: prompts per batch")
    p.add_argument("--max-tiles", type=int, default=6, help="--model InternVL: 448-px tiles per image")
    p.add_argument("--min-pixels", type=int, default=256 * 28 * 28, help="--model Qwen: pixel budget")
    p.add_argument("--max-pixels", type=int, default=1344 * 28 * 28, help="--model Qwen: pixel budget")
    p.add_argument("--system", default=None, help="--model: system message (default: the family's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default=None, help="--model: default cuda if available")
    a = p.parse_args(argv)
    if a.server and not a.server_model:
        p.error("--server needs --server-model")
    if a.model and a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    return run(a)


if __name__ == "__main__":
    main()
