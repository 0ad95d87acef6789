"""Spatial Relationship Prediction (SRP) data, MP-GUI stage 3, from Rico Semantic UI view hierarchies.

    python tools/srp.py semantic_annotations/ training_data/srp [--style both] [--image-prefix Rico/]

The folder holds Rico Semantic UI files {id}.json (nested `children`; each node has `bounds` [x1, y1, x2, y2] in
screen pixels, `componentLabel`, and `iconClass` for icons) and, optionally, {id}.png beside them, whose size is the
screen size (else --size, Rico's 1440x2560). Writes OUT/srp_natural.jsonl and/or OUT/srp_xml.jsonl (one line per
question, image "{prefix}{id}.jpg") and OUT/srp_meta.json.

Rebuilt from the official data_tools/get_spatial_relationship_prediction_data.py and its XML_format_ twin (commit
232455c): the same five relations, prompts, answers and label rules, 2 negatives of each kind per node. Deviations:
an off-screen node (a coordinate < 0 or past the screen) is dropped with its subtree everywhere (upstream still
offers it as a sibling or an unrelated node, giving boxes outside 0-1000); the unrelated node is drawn among the
eligible nodes (upstream: 51 tries of rejection sampling, same distribution); boxes are exact integer floors.
"""
import argparse
import json
import os
import random
import sys

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.common import Skips, conv, write_jsonl, write_meta  # noqa: E402

RELATIONS = {0: "sibling", 1: "contains", 2: "inside", 3: "no containment", 4: "unrelated"}
QUESTIONS = {
    "natural": ["What is the relationship between the elements at {} and {}?",
                "How are the items situated in {} and {} related to one another?",
                "How do the elements in {} and {} relate to each other?",
                "There are two components at {} and {}. What is their relationship?",
                "What type of spatial relationship exists between the components at {} and {}?",
                "What is the connection between the item at {} and {}?"],
    "xml": ["Output the relationship between the elements at {} and {}.(with XML format)",
            "How are the items situated in {} and {} related to one another?(with XML format)",
            "How do the elements in {} and {} relate to each other?(with XML format)",
            "There are two components at {} and {}. What is their relationship?(with XML format)",
            "What is the relationship between the item at {} and {}?(with XML format)"],
}
ANSWERS = {  # by relation; 1 and 2 share theirs (node 1 = the child, node 2 = the parent); node 3 = the parent
    "natural": {
        0: ['Both "{type1}" at {bbox1} and "{type2}" at {bbox2} are positioned inside "{type3}" at {bbox3}.',
            '"{type1}" at {bbox1} and "{type2}" at {bbox2} are siblings inside "{type3}" at {bbox3}.',
            'Both "{type1}" at {bbox1} and "{type2}" at {bbox2} are contained by "{type3}" at {bbox3}.',
            '"{type1}" at {bbox1} and "{type2}" at {bbox2} are sibling elements from "{type3}" at {bbox3}.'],
        1: ['The element at {bbox1} is "{type1}", contained in the "{type2}" at {bbox2}.',
            'At coordinates {bbox1}, the element is "{type1}", contained by the "{type2}" at {bbox2}.',
            'The item located at {bbox1} is identified as "{type1}", positioned inside the "{type2}" defined by '
            '{bbox2}.',
            'The region at {bbox2} is recognized as "{type2}", containing the component "{type1}" at {bbox1}.',
            'The area {bbox2} serves as "{type2}", including the element "{type1}" at {bbox1}.',
            'The space defined by {bbox2} is "{type2}" and contains the element "{type1}" at {bbox1}.'],
        3: ["The elements at coordinates {bbox1} and {bbox2} have no direct link.",
            "The components located at {bbox1} and {bbox2} do not have a direct connection.",
            "There is no direct relationship between the items at {bbox1} and {bbox2}.",
            "No direct relationship can be found between the components at {bbox1} and {bbox2}."],
        4: ['"{type1}" at {bbox1} lacks a direct link with "{type2}" at {bbox2}.',
            '"{type1}" at {bbox1} and "{type2}" at {bbox2} are not directly related.',
            '"{type1}" at {bbox1} and "{type2}" at {bbox2} lack a direct relationship.',
            'There is no direct connection between "{type1}" at {bbox1} and "{type2}" at {bbox2}.']},
    "xml": {
        0: ["Related:\n<{type3}>\n    <box>{bbox3}</box>\n    <{type1}>\n        <box>{bbox1}</box>\n    </{type1}>\n"
            "    <{type2}>\n        <box>{bbox2}</box>\n    </{type2}>\n</{type3}>"],
        1: ["Related:\n<{type2}>\n    <box>{bbox2}</box>\n    <{type1}>\n        <box>{bbox1}</box>\n    </{type1}>\n"
            "</{type2}>"],
        3: ["Unrelated:\n<{type1}>\n    <box>{bbox1}</box>\n</{type1}>,\n"
            "<Unknown>\n    <box>{bbox2}</box>\n</Unknown>"],
        4: ["Unrelated:\n<{type1}>\n    <box>{bbox1}</box>\n</{type1}>,\n"
            "<{type2}>\n    <box>{bbox2}</box>\n</{type2}>"]},
}


def label(node, style):
    """The node's name in the answers: componentLabel ("Text Button" -> "Button"; XML: spaces -> "_", "On/Off
    Switch" -> "Switch"), else iconClass, else "Unknown"."""
    name = node["label"]
    if style == "xml":
        name = name.replace(" ", "_")
        name = {"On/Off_Switch": "Switch", "Text_Button": "Button"}.get(name, name)
    else:
        name = "Button" if name == "Text Button" else name
    return name or node["icon"] or "Unknown"


def on_screen(b, size):
    return all(v >= 0 for v in b) and b[0] <= size[0] and b[2] <= size[0] and b[1] <= size[1] and b[3] <= size[1]


def count_nodes(nodes):
    return sum(1 + count_nodes(n.get("children") or []) for n in nodes if isinstance(n, dict))


def clean(nodes, where, size, skips):
    """The on-screen part of a hierarchy as {label, icon, bounds, children}; raises on a malformed node."""
    if not isinstance(nodes, list):
        raise ValueError(f"{where}: 'children' is not a list")
    out = []
    for k, n in enumerate(nodes):
        at = f"{where}[{k}]"
        b = n.get("bounds") if isinstance(n, dict) else None
        if not (isinstance(b, list) and len(b) == 4 and all(type(v) in (int, float) for v in b)):
            raise ValueError(f"{at}.bounds: expected [x1, y1, x2, y2] numbers, got {b!r}")
        if not on_screen(b, size):
            skips("off-screen node (with its subtree)", f"{at} bounds {b} outside {size[0]}x{size[1]}",
                  count_nodes([n]))
            continue
        out.append(dict(label=n.get("componentLabel") or "", icon=n.get("iconClass") or "",
                        bounds=[int(v) for v in b], children=clean(n.get("children", []), at + ".children", size,
                                                                   skips)))
    return out


def iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def enclosing_box(node, parent, size, rng, tries=50):
    """A random box that encloses the node, IoU <= 0.1 with it and <= 0.3 with its parent; None after 50 tries."""
    (x1, y1, x2, y2), (w, h) = node, size
    for _ in range(tries):
        box = [rng.randint(0, x1), rng.randint(0, y1), rng.randint(x2, w), rng.randint(y2, h)]
        if iou(box, node) <= 0.1 and iou(box, parent) <= 0.3:
            return box
    return None


def relations(roots, size, rng, num=2):
    """Upstream's DFS: (node1, relation, node2[, parent]) tuples, in its order."""
    every, out = [], []

    def flat(nodes):
        for n in nodes:
            every.append(n)
            flat(n["children"])

    def visit(node, parent):
        if parent is not None:
            out.extend([(parent, 1, node), (node, 2, parent)])
            for _ in range(num):
                box = enclosing_box(node["bounds"], parent["bounds"], size, rng)
                if box is not None:
                    out.append((node, 3, dict(parent, bounds=box)))
            if len(parent["children"]) >= 2:
                out.extend((node, 0, s, parent) for s in parent["children"] if s is not node)
                taken = [parent["bounds"]] + [s["bounds"] for s in parent["children"] + node["children"]]
                pool = [n for n in every if n["bounds"] not in taken]  # not the parent, a sibling or a child
                out.extend((node, 4, rng.choice(pool)) for _ in range(num) if pool)
        for child in node["children"]:
            visit(child, node)

    flat(roots)
    for root in roots:
        visit(root, None)
    return out


def norm(b, size):  # screen pixels -> 0-1000 integers, floored
    return [int(b[0] * 1000 // size[0]), int(b[1] * 1000 // size[1]), int(b[2] * 1000 // size[0]),
            int(b[3] * 1000 // size[1])]


def render(rel, style, size, rng):
    """(question, answer) of one relation in one style, or None when both boxes are the same (upstream drops it)."""
    (a, r, b), parent = rel[:3], rel[3] if len(rel) > 3 else None
    b1, b2 = norm(a["bounds"], size), norm(b["bounds"], size)
    if b1 == b2:
        return None
    question = rng.choice(QUESTIONS[style]).format(b1, b2)
    f = dict(bbox1=b1, type1=label(a, style), bbox2=b2, type2=label(b, style))
    if r == 1:  # asked parent first, answered child first
        f = dict(bbox1=b2, type1=label(b, style), bbox2=b1, type2=label(a, style))
    if r == 0:
        f.update(bbox3=norm(parent["bounds"], size), type3=label(parent, style))
    return question, rng.choice(ANSWERS[style][1 if r == 2 else r]).format(**f)


def screen_size(png, default):
    if os.path.isfile(png):
        with Image.open(png) as im:
            return im.size
    return default


def generate(folder, styles=("natural", "xml"), ids=None, size=(1440, 2560), image_prefix="Rico/", seed=0, num=2,
             skips=None):
    """{style: [jsonl records]} for every {id}.json in the folder (or the given ids)."""
    skips = skips if skips is not None else Skips()
    ids = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json")) if ids is None else ids
    out = {s: [] for s in styles}
    for rid in tqdm(ids, desc="srp", file=sys.stderr):
        path = os.path.join(folder, rid + ".json")
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            wh = screen_size(os.path.join(folder, rid + ".png"), size)
            if not isinstance(doc, dict) or "children" not in doc:
                raise ValueError("no top-level 'children'")
            roots = clean(doc["children"], "children", wh, skips)
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            skips("unreadable file", f"{path}: {e}")
            continue
        rels = relations(roots, wh, random.Random(f"{seed}/{rid}"), num)
        for style in styles:
            rng = random.Random(f"{seed}/{rid}/{style}")
            for rel in rels:
                qa = render(rel, style, wh, rng)
                if qa is None:
                    skips("same box twice")
                    continue
                out[style].append(dict(id=len(out[style]), image=f"{image_prefix}{rid}.jpg", relation=RELATIONS[rel[1]],
                                       conversations=conv(*qa)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="Rico Semantic UI folder of {id}.json (+ {id}.png)")
    p.add_argument("out", help="output folder")
    p.add_argument("--style", choices=["natural", "xml", "both"], default="both", help="answer style(s)")
    p.add_argument("--index", help="json list of screenshot names ('123.jpg') to use, as upstream's index")
    p.add_argument("--size", default="1440x2560", help="screen WxH when {id}.png is absent")
    p.add_argument("--image-prefix", default="Rico/", help="image field = PREFIX + id + .jpg")
    p.add_argument("--image-root", default="", help="meta 'root' that image paths are relative to")
    p.add_argument("--num", type=int, default=2, help="negatives of each kind per node (official 2)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    size = tuple(int(v) for v in a.size.lower().split("x"))
    ids = None
    if a.index:
        ids = [os.path.splitext(name)[0] for name in json.load(open(a.index, encoding="utf-8"))]
    styles = ["natural", "xml"] if a.style == "both" else [a.style]
    skips = Skips()
    out = generate(a.folder, styles, ids, size, a.image_prefix, a.seed, a.num, skips)
    files = {}
    for style, records in out.items():
        files[f"SRP_{style}"] = os.path.join(a.out, f"srp_{style}.jsonl")
        write_jsonl(files[f"SRP_{style}"], records)
    write_meta(os.path.join(a.out, "srp_meta.json"), files, a.image_root)
    print(f"srp: {', '.join(f'{s} {len(r)}' for s, r in out.items())} samples; skipped: {skips.summary()}")
    return out, skips


if __name__ == "__main__":
    main()
