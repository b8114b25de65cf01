"""The CORE metric (DCLM, arXiv:2406.11794) as upstream nanochat's base eval computes it.

An eval bundle (default `<base>/eval_bundle`, prepared on a machine with internet by
`python -m scripts.base_eval --download_bundle`) holds:
  core.yaml           - `icl_tasks:` a list of {label, icl_task_type, dataset_uri, num_fewshot: [k], continuation_delimiter}
  eval_meta_data.csv  - one row per task with columns `Eval Task` (the label) and `Random baseline` (in percent)
  eval_data/<uri>     - one JSON object per line; by task type:
      multiple_choice:   {"query", "choices": [...], "gold": i}       the choices are the continuations
      schema:            {"context_options": [...], "continuation", "gold": i}   the contexts vary
      language_modeling: {"context", "continuation"}                  correct = exact greedy match

Protocol (upstream's): each task's examples are shuffled with random.Random(1337) and optionally cut to
the first `max_per_task`; example i gets `num_fewshot` demonstrations sampled from the other examples with
random.Random(1234 + i); every prompt is tokenized with a leading BOS; the tokens being scored are the
continuation, located as the tokens after the common prefix (multiple choice), the common suffix
(schema) or after the prompt without its continuation (language modeling). Multiple choice and schema
pick the option with the lowest mean loss over those tokens; language modeling is correct when the
greedy prediction equals every continuation token. A sequence longer than the model can take keeps its
last `max_seq_len` tokens. Per task: accuracy, and centered accuracy
(acc - 0.01 * baseline) / (1 - 0.01 * baseline); CORE is the mean of the centered accuracies.
Under torchrun the examples of each task are split over ranks and the results all-reduced.
"""

import csv
import json
import os
import random
import shutil
import tempfile
import time
import urllib.error
import zipfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat.common import UserError, download, first_sentence, get_base_dir, print0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_DIRNAME = "eval_bundle"
CONFIG_FILE = "core.yaml"
META_FILE = "eval_meta_data.csv"
DATA_DIRNAME = "eval_data"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
PREPARE_HINT = ("prepare it on a machine with internet (e.g. a login node): python -m scripts.base_eval --download_bundle "
                "(or copy an unzipped eval_bundle/ there)")
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


def get_bundle_dir(bundle_dir=None):
    return bundle_dir or os.path.join(get_base_dir(), BUNDLE_DIRNAME)


# ---------------------------------------------------------------- the bundle

@dataclass
class CoreTask:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent, as in eval_meta_data.csv
    data: list = field(default_factory=list, repr=False)


def _yaml_load(path):
    import yaml  # pyyaml; only needed when a bundle is read
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_bundle(bundle_dir=None, max_per_task=-1):
    """Read core.yaml, the random baselines and every task's examples (shuffled, cut to max_per_task).

    Any missing or malformed part is a one-line UserError that says how to prepare the bundle,
    so a training run can check it before it starts.
    """
    bundle_dir = get_bundle_dir(bundle_dir)
    config_path = os.path.join(bundle_dir, CONFIG_FILE)
    meta_path = os.path.join(bundle_dir, META_FILE)
    for path in (config_path, meta_path):
        if not os.path.isfile(path):
            what = "no CORE eval bundle" if not os.path.isdir(bundle_dir) else f"the CORE eval bundle has no {os.path.basename(path)}"
            raise UserError(f"{what} at {bundle_dir}; {PREPARE_HINT}")
    try:
        config = _yaml_load(config_path)
        specs = config["icl_tasks"]
        if not isinstance(specs, list) or not specs:
            raise ValueError("icl_tasks is empty")
        with open(meta_path, encoding="utf-8", newline="") as f:
            baselines = {row["Eval Task"]: row["Random baseline"] for row in csv.DictReader(f)}
    except Exception as e:  # yaml errors, missing keys, bad numbers: all mean a damaged bundle
        raise UserError(f"the CORE eval bundle at {bundle_dir} is malformed ({type(e).__name__}: {first_sentence(e)}); "
                        f"delete it and {PREPARE_HINT}") from None
    tasks = []
    for spec in specs:
        label = spec.get("label") if isinstance(spec, dict) else None
        task_type = spec.get("icl_task_type") if label else None
        if task_type not in TASK_TYPES or "dataset_uri" not in spec:
            raise UserError(f"the CORE eval bundle at {bundle_dir} has a task entry this evaluator cannot run ({str(spec)[:100]}); "
                            f"supported types: {', '.join(TASK_TYPES)}")
        try:
            baseline = float(baselines[label])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{META_FILE} in {bundle_dir} has no random baseline for task {label!r}") from None
        shots = spec.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        data_path = os.path.join(bundle_dir, DATA_DIRNAME, spec["dataset_uri"])
        if not os.path.isfile(data_path):
            raise UserError(f"the CORE eval bundle at {bundle_dir} lacks {os.path.join(DATA_DIRNAME, spec['dataset_uri'])}; "
                            f"delete it and {PREPARE_HINT}")
        data = _read_examples(data_path)
        random.Random(SHUFFLE_SEED).shuffle(data)  # files are often ordered; a cut must be a fair sample
        if max_per_task > 0:
            data = data[:max_per_task]
        tasks.append(CoreTask(label, task_type, int(shots), spec.get("continuation_delimiter", " "), baseline, data))
    return tasks


def _read_examples(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read CORE task data {path} ({first_sentence(e)})") from None
    if not data:
        raise UserError(f"CORE task data {path} has no examples")
    return data


# ---------------------------------------------------------------- prompts

def render_mc(item, delimiter, fewshot=()):
    """One prompt per choice: demonstrations (query, gold choice) separated by blank lines, then query + choice."""
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item, delimiter, fewshot=()):
    """One prompt per context option, all ending in the same continuation."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_lm(item, delimiter, fewshot=()):
    """[prompt without the continuation, prompt with it]. Contexts are stripped (some carry trailing
    whitespace), and the prompt without is stripped again so a trailing space of the delimiter joins the
    continuation's first token, as it does in the prompt with."""
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{prefix}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


RENDER = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}


def sample_fewshot(data, idx, k):
    """k demonstrations for example idx, never idx itself; fixed by idx alone (Random(1234 + idx))."""
    k = min(k, len(data) - 1)
    if k <= 0:
        return []
    rng = random.Random(FEWSHOT_SEED + idx)
    return [data[i] for i in rng.sample([i for i in range(len(data)) if i != idx], k)]


# ---------------------------------------------------------------- locating the continuation

def common_length(seqs, from_end=False):
    """Length of the prefix (or suffix) that all sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def locate(task_type, tokens):
    """(sequences, starts, ends): the model is scored on tokens[start:end] of each sequence.

    multiple_choice: after the prefix all choices share; schema: the suffix all options share;
    language_modeling: `tokens` is [without, with] and only the second is run, scored after the first
    (when tokenization moved the boundary, after the longest common prefix). Each span keeps at least
    one token (a choice that is a prefix of another is scored on its last token).
    """
    if task_type == "multiple_choice":
        start = common_length(tokens)
        starts = [start] * len(tokens)
    elif task_type == "schema":
        suffix = common_length(tokens, from_end=True)
        starts = [len(t) - suffix for t in tokens]
    elif task_type == "language_modeling":
        without, with_ = tokens
        start = len(without) if with_[:len(without)] == without else common_length(tokens)
        tokens, starts = [with_], [start]
    else:
        raise ValueError(f"unknown task type {task_type!r}")
    ends = [len(t) for t in tokens]
    starts = [max(1, min(s, e - 1)) for s, e in zip(starts, ends)]
    return tokens, starts, ends


def crop(tokens, starts, ends, max_len):
    """Keep the last max_len tokens of each sequence and shift its span (at least one context token stays)."""
    out_t, out_s, out_e = [], [], []
    for t, s, e in zip(tokens, starts, ends):
        cut = max(0, len(t) - max_len)
        out_t.append(t[cut:])
        out_s.append(max(1, s - cut))
        out_e.append(e - cut)
    return out_t, out_s, out_e


def prepare_example(task, idx, tokenizer, max_len=None):
    """Tokens and spans of example idx of a task (BOS first, as the model was trained)."""
    item = task.data[idx]
    prompts = RENDER[task.task_type](item, task.delimiter, sample_fewshot(task.data, idx, task.num_fewshot))
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    tokens, starts, ends = locate(task.task_type, tokens)
    if max_len is not None:
        tokens, starts, ends = crop(tokens, starts, ends, max_len)
    return tokens, starts, ends


# ---------------------------------------------------------------- scoring

def _stack(tokens, pad_id, device):
    """Right-pad with pad_id (harmless: attention is causal and padding comes after every span)."""
    ids = torch.full((len(tokens), max(len(t) for t in tokens)), pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return ids.to(device)


def token_losses(model, ids):
    """losses[b, t] = loss of predicting ids[b, t + 1] (the last column is unused)."""
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -1
    return model(ids, targets, loss_reduction="none").float()


def greedy_predictions(model, ids):
    """predictions[b, t] = the model's most likely token after ids[b, :t + 1]."""
    return model(ids).argmax(dim=-1)


@torch.no_grad()
def score_example(model, tokens, starts, ends, task_type, gold, pad_id, device):
    """True when the model gets this example right."""
    ids = _stack(tokens, pad_id, device)
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(greedy_predictions(model, ids)[0, s - 1:e - 1], ids[0, s:e]))
    losses = token_losses(model, ids)
    means = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return means.index(min(means)) == gold


def model_max_len(model):
    """The longest sequence the model can forward: an explicit `max_seq_len`, else its rotary table."""
    if getattr(model, "max_seq_len", None):
        return model.max_seq_len
    cos = getattr(model, "cos", None)
    return cos.size(1) if isinstance(cos, torch.Tensor) else None


def evaluate_task(model, tokenizer, task, device, max_len=None, stop=None):
    """Accuracy on one task; under torchrun each rank takes every world_size-th example. With `stop`
    (nanochat.stopping), a stop signal skips this rank's remaining examples and all ranks stop together
    at `stop.check()` before the reduction (ranks own different numbers of examples)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    correct = torch.zeros(len(task.data), dtype=torch.float32, device=device)
    pad_id = tokenizer.get_bos_token_id()
    for idx in range(rank, len(task.data), world):
        if stop is not None and stop.requested():
            break
        tokens, starts, ends = prepare_example(task, idx, tokenizer, max_len)
        gold = task.data[idx].get("gold")
        correct[idx] = float(score_example(model, tokens, starts, ends, task.task_type, gold, pad_id, device))
    if stop is not None:
        stop.check()
    if world > 1:
        dist.all_reduce(correct)
    return correct.mean().item()


def centered_accuracy(accuracy, random_baseline):
    """Rescale so chance is 0 and perfect is 1; random_baseline is in percent."""
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)


def core_metric(centered_results):
    return sum(centered_results.values()) / len(centered_results)


def evaluate_core(model, tokenizer, device, tasks=None, max_per_task=-1, max_seq_len=None, log=print0, stop=None):
    """Evaluate every task of the bundle; returns {results, centered_results, core_metric, random_baselines, examples}.

    `tasks` is what load_bundle returned (load it once and reuse it in a training loop); without it the
    bundle in the base dir is read. `max_seq_len` defaults to what the model can forward. `stop`: see evaluate_task.
    """
    if tasks is None:
        tasks = load_bundle(max_per_task=max_per_task)
    max_len = max_seq_len or model_max_len(model)
    results, centered = {}, {}
    for task in tasks:
        t0 = time.time()
        results[task.label] = evaluate_task(model, tokenizer, task, device, max_len, stop=stop)
        centered[task.label] = centered_accuracy(results[task.label], task.random_baseline)
        if log:
            log(f"Evaluating: {task.label} ({task.num_fewshot}-shot, type: {task.task_type}, {len(task.data)} examples)... "
                f"accuracy: {results[task.label]:.4f} | centered: {centered[task.label]:.4f} | time: {time.time() - t0:.2f}s")
    return {"results": results, "centered_results": centered, "core_metric": core_metric(centered),
            "random_baselines": {t.label: t.random_baseline for t in tasks},
            "examples": {t.label: len(t.data) for t in tasks}}


# ---------------------------------------------------------------- preparing the bundle (needs internet)

def _check_zip(path):
    with zipfile.ZipFile(path) as z:
        if z.testzip() is not None:
            raise zipfile.BadZipFile("a member fails its CRC check")


def download_bundle(bundle_dir=None, url=None, retries=5, backoff=2.0, timeout=60, log=print):
    """Fetch eval_bundle.zip, check and unzip it, and move eval_bundle/ into place atomically.

    url defaults to $NANOCHAT_EVAL_BUNDLE_URL, else upstream's. An existing bundle is kept.
    """
    bundle_dir = get_bundle_dir(bundle_dir)
    if os.path.isfile(os.path.join(bundle_dir, CONFIG_FILE)):
        log(f"CORE eval bundle already present at {bundle_dir}")
        return bundle_dir
    url = url or os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL
    parent = os.path.dirname(os.path.abspath(bundle_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".eval_bundle_download_") as tmp:
        zip_path = os.path.join(tmp, "eval_bundle.zip")
        error = download(url, zip_path, retries, backoff, timeout, check=_check_zip)
        if error is not None:
            if isinstance(error, urllib.error.HTTPError):
                reason = f"HTTP {error.code} {error.reason}"
            else:
                reason = str(getattr(error, "reason", error))
            raise UserError(f"downloading the CORE eval bundle from {url} failed after {retries} tries ({reason}); "
                            "this needs internet: run it on a login node, or copy an unzipped eval_bundle/ to "
                            f"{bundle_dir}")
        extract = os.path.join(tmp, "extract")
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(extract)
        found = os.path.join(extract, BUNDLE_DIRNAME)
        if not os.path.isdir(found):
            found = extract  # a zip of the bundle's contents rather than of the folder
        if not os.path.isfile(os.path.join(found, CONFIG_FILE)):
            raise UserError(f"the archive from {url} holds no {BUNDLE_DIRNAME}/{CONFIG_FILE}; is it the CORE eval bundle?")
        if os.path.isdir(bundle_dir):
            shutil.rmtree(bundle_dir)  # an incomplete earlier copy (it had no core.yaml)
        os.replace(found, bundle_dir)
    log(f"Placed the CORE eval bundle at {bundle_dir}")
    return bundle_dir
