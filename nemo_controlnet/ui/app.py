"""The Gradio page: Datasets, Runs, Generate. Layout and wiring only; the work is done by
ui/datasets.py (prep), ui/runs.py (training subprocesses) and ui/generation.py (sampling)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import gradio as gr
import numpy as np
from omegaconf import OmegaConf

from nemo_controlnet.config import ConfigError
from nemo_controlnet.data.decode import BadSample
from nemo_controlnet.inference.generate import default_guidance
from nemo_controlnet.ui import datasets as ds
from nemo_controlnet.ui.generation import Generator
from nemo_controlnet.ui.overrides import ProblemsError, run_overrides
from nemo_controlnet.ui.paths import Roots
from nemo_controlnet.ui.runs import RunManager

log = logging.getLogger(__name__)

SCAN_LIMIT = 2000  # inputs read to count readable and skipped ones for the preview
MODELS = ("tiny", "sd15", "sd21", "sdxl", "local_diffusers", "local_diffusers_xl")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
DATASET_FIELDS = ("layout", "source", "name", "out_root", "caption", "use_controlnet", "control_type", "on_the_fly",
                  "precompute", "hint_layout", "low_threshold", "high_threshold", "blur", "control_size",
                  "shard_size")  # fmt: skip
RUN_FIELDS = ("run_name", "dataset", "model", "model_path", "steps", "batch_size", "learning_rate", "precision",
              "checkpoint_every", "extra")  # fmt: skip


def _error(message: str | None) -> str:
    return f"⚠ {message}" if message else ""


class App:
    """The page's state: roots, the prep jobs, the runs, the loaded generators."""

    def __init__(self, roots: Roots, runs_root: Path, prep_workers: int = 2):
        self.roots, self.runs = roots, RunManager(runs_root)
        self.runs_root = runs_root
        self.prep = ds.PrepRunner()
        self.generator = Generator()
        self.prep_workers = prep_workers
        self._previews: dict[tuple, object] = {}

    # ---- Datasets
    def form(self, *values) -> ds.DatasetForm:
        form = ds.DatasetForm(**dict(zip(DATASET_FIELDS, values)), workers=self.prep_workers)
        form.source, form.out_root = (form.source or "").strip(), (form.out_root or "").strip()
        return form

    def preview_source(self, form: ds.DatasetForm):
        from nemo_controlnet.prep.preview import SourcePreview

        overrides = ds.source_overrides(form, self.roots)
        key = tuple(overrides)
        if key not in self._previews:
            cfg = ds.compose_prep(overrides + ["out_dir=unused"])
            self._previews = {key: SourcePreview(cfg.source)}  # one source at a time
        return self._previews[key]

    def preview(self, index, *values):
        form = self.form(*values)
        problems = ds.form_problems(form, self.roots, for_job=False)
        errors = [_error(problems.get(name)) for name in DATASET_FIELDS]
        if problems:
            return None, "", gr.update(), *errors
        try:
            source = self.preview_source(form)
            scan = source.scan(limit=SCAN_LIMIT)
            total = len(source)
        except Exception as e:  # an unreadable source: said at its field, nothing starts
            log.warning("preview of %s failed: %s", form.source, e)
            errors[DATASET_FIELDS.index("source")] = _error(f"{type(e).__name__}: {e}")
            return None, "", gr.update(), *errors
        skipped = ", ".join(f"{Path(s).name} ({r})" for s, r, *_ in scan.skipped[:10])
        counts = f"{scan.readable} readable, {len(scan.skipped)} skipped" + (f": {skipped}" if skipped else "")
        counts += f" (of the first {SCAN_LIMIT})" if total > SCAN_LIMIT else ""
        index = min(max(int(index or 0), 0), max(total - 1, 0))
        picker = gr.update(maximum=max(total - 1, 1), value=index)
        try:
            pair = source.pair(index, OmegaConf.create(form.hint_config()), ds._int(form.control_size) or None)
        except BadSample as e:  # this sample is one prep skips: say so, show no pair
            return None, f"{counts} · sample {index} is skipped by prep: {e}", picker, *errors
        except ConfigError as e:
            errors[DATASET_FIELDS.index("control_size")] = _error(str(e))
            return None, counts, picker, *errors
        counts += f" · sample {index}: {Path(pair.source).name} · {pair.caption!r}"
        return ds.side_by_side(pair.image, pair.hint), counts, picker, *errors

    def start_prep(self, *values):
        form = self.form(*values)
        problems = ds.form_problems(form, self.roots)
        errors = [_error(problems.get(name)) for name in DATASET_FIELDS]
        if problems:
            return "", "not started: fix the marked fields", "", *errors
        overrides = ds.prep_overrides(form, self.roots)
        out = ds.output_dir(form, self.roots)
        try:
            cfg = ds.compose_prep(overrides)
            ds.save_settings(out, cfg, overrides, form, self.roots)
            self.prep.start(out, cfg, overrides)
        except Exception as e:  # a config the command would refuse: its message, no job
            return "", f"not started: {e}", "", *errors
        return str(out), f"started: {ds.PREP_COMMAND} in {out}", "", *errors

    def resume_prep(self, out: str):
        if not out:
            return "no dataset job to resume yet"
        path = self.roots.resolve(out, "dataset")
        record = ds.json.loads((path / ds.DATASET_RECORD).read_text())
        cfg = OmegaConf.load(path / ds.PREP_CONFIG)
        self.prep.start(path, cfg, record["prep_overrides"])
        return f"resumed: {path}"

    def cancel_prep(self, out: str):
        state = self.prep.cancel(Path(out)) if out else None
        return "cancel requested: complete shards stay" if state else "no running job"

    def prep_status(self, out: str):
        state = self.prep.get(Path(out)) if out else None
        bar, line = ds.describe(state)
        rows = ds.skipped_rows(state, Path(out)) if out else []
        return bar, line, rows

    # ---- Runs
    def run_choices(self) -> list[str]:
        return [info.name for info in self.runs.list_runs()]

    def start_run(self, *values):
        v = dict(zip(RUN_FIELDS, values))
        problems: dict[str, str] = {}
        name = (v["run_name"] or "").strip()
        dataset = (v["dataset"] or "").strip() or None
        try:
            extra = shlex.split(v["extra"] or "")
        except ValueError as e:
            problems["extra"], extra = f"more overrides: {e}", []
        if dataset:
            problem = self.roots.problem(dataset, "dataset")
            if problem:
                problems["dataset"] = problem
            else:
                dataset = str(self.roots.resolve(dataset))
        if v["model"].startswith("local_"):
            problem = self.roots.problem(v["model_path"] or "", "model path")
            if problem:
                problems["model_path"] = problem
            else:
                extra.append(f"model.path={ds.quote(self.roots.resolve(v['model_path']))}")
        overrides, more = run_overrides(v["model"], v["steps"], v["batch_size"], v["learning_rate"], v["precision"],
                                        v["checkpoint_every"], dataset=dataset, extra=extra)  # fmt: skip
        problems.update(more)
        if not problems:
            try:
                self.runs.start(name, overrides)
            except ProblemsError as e:  # the composed config's problems, keyed by the field that set the key
                problems.update({"run_name" if k == "name" else k: v for k, v in e.problems.items()})
            except (ValueError, RuntimeError, OSError) as e:
                problems["run_name"] = str(e)
        if any(k not in RUN_FIELDS for k in problems):  # keys without a field of their own: under the extras
            problems["extra"] = "; ".join(v for k, v in problems.items() if k not in RUN_FIELDS)
        errors = [_error(problems.get(f)) for f in RUN_FIELDS]
        message = "not started: fix the marked fields" if problems else f"started {name}"
        return message, gr.update(choices=self.run_choices(), value=name if not problems else None), *errors

    def stop_run(self, name: str):
        if not name:
            return "pick a run"
        self.runs.stop(name)
        return f"{name}: {self.runs.status(name).state}"

    def resume_run(self, name: str):
        if not name:
            return "pick a run"
        self.runs.resume(name)
        return f"{name}: resumed"

    def run_status(self, name: str):
        import pandas as pd

        choices = gr.update(choices=self.run_choices())
        if not name:
            return choices, "", pd.DataFrame({"step": [], "loss": []}), None, [], ""
        info = self.runs.status(name)
        curve = self.runs.loss_curve(name)
        frame = pd.DataFrame({"step": [s for s, _ in curve], "loss": [x for _, x in curve]})
        metrics = self.runs.metrics(name)
        numeric = {k for row in metrics for k in row if isinstance(row[k], (int, float))}
        keys = sorted(numeric, key=lambda k: (k != "step", k))  # step first
        table = [[row.get(k) for k in keys] for row in metrics]
        grid = str(info.grid) if info.grid else None
        line = f"{info.state} · step {info.step if info.step is not None else '-'}"
        return choices, line, frame, grid, gr.update(value=table, headers=keys or None), info.log_tail

    # ---- Generate
    def _controlnet(self, controlnet: str) -> tuple[str | None, str | None]:
        """(the picked ControlNet's resolved path: a run's name under the runs root, or a path, or None with
        what is wrong)."""
        candidate = self.runs_root / controlnet if "/" not in controlnet else controlnet
        problem = self.roots.problem(candidate, "controlnet")
        return (None, problem) if problem else (str(self.roots.resolve(candidate)), None)

    def guidance_for(self, controlnet):
        """The guidance slider at the picked ControlNet's family default (unchanged when it cannot be read)."""
        path = self._controlnet(controlnet)[0] if controlnet else None
        if path is None:
            return gr.update()
        try:
            return gr.update(value=default_guidance(path))
        except (OSError, ValueError, KeyError) as e:  # not (yet) an exported ControlNet: leave the slider
            log.debug("no guidance default for %s: %s", controlnet, e)
            return gr.update()

    def generate(self, controlnet, kind, upload, prompt, negative, scale, guidance, steps, seed, low, high, blur):
        if not controlnet:
            return None, None, "pick a run or an exported ControlNet"
        path, problem = self._controlnet(controlnet)
        if problem:
            return None, None, _error(problem)
        if upload is None:
            return None, None, _error("upload an image or a hint")
        form = ds.DatasetForm(low_threshold=low, high_threshold=high, blur=blur)
        problems = ds.control_problems(form) if kind == "image" else {}
        if problems:
            return None, None, _error("; ".join(problems.values()))
        image = np.asarray(upload)[:, :, :3]
        canny = {k: v for k, v in form.hint_config().items() if k != "_target_"}
        result = self.generator.generate(
            path, prompt or "", hint=image if kind == "hint" else None,
            image=image if kind == "image" else None, canny=canny if kind == "image" else None,
            negative_prompt=negative or None, control_scale=float(scale), guidance_scale=float(guidance),
            steps=int(steps), seed=int(seed),
        )  # fmt: skip
        return result.images, result.hint, f"{len(result.images)} image(s)"


def build(app: App) -> gr.Blocks:
    with gr.Blocks(title="controlnet-ui", analytics_enabled=False) as page:
        gr.Markdown("# controlnet-ui")
        with gr.Tab("Datasets", id="datasets", elem_id="tab-datasets"):
            c = dataset_tab(app)
        with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
            runs_tab(app)
        with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
            generate_tab(app, c)
    return page


def _field(errors: dict, name: str, kind, *args, **kwargs):
    """A form field (elem_id ``f-<name>``) with its error line under it (``err-<name>``)."""
    component = kind(*args, elem_id=f"f-{name}", **kwargs)
    errors[name] = gr.Markdown("", elem_id=f"err-{name}", elem_classes=["field-error"])
    return component


def dataset_tab(app: App) -> dict:
    e: dict[str, gr.Markdown] = {}
    c: dict[str, gr.components.Component] = {}
    gr.Markdown("## New dataset")
    with gr.Row():
        with gr.Column():
            c["layout"] = _field(e, "layout", gr.Dropdown, list(ds.LAYOUTS), value="folder", label="Source layout")
            c["source"] = _field(e, "source", gr.Textbox, label="Source path")
            c["caption"] = _field(e, "caption", gr.Textbox, label="Caption for all (empty: <stem>.txt)")
            c["name"] = _field(e, "name", gr.Textbox, label="Dataset name")
            c["out_root"] = _field(e, "out_root", gr.Textbox, label="Output directory")
        with gr.Column():
            gr.Markdown("### ControlNet")
            c["use_controlnet"] = _field(e, "use_controlnet", gr.Checkbox, True, label="Use ControlNet (Canny)")
            c["control_type"] = _field(e, "control_type", gr.Radio, list(ds.CONTROL_TYPES), value="canny", label="Type")
            c["on_the_fly"] = _field(e, "on_the_fly", gr.Checkbox, False, label="Generate on the fly (in training)")
            c["precompute"] = _field(e, "precompute", gr.Checkbox, True, label="Precompute control images")
            c["hint_layout"] = _field(e, "hint_layout", gr.Radio, list(ds.HINT_LAYOUTS), value="shards", label="Into")
            c["low_threshold"] = _field(e, "low_threshold", gr.Slider, 0, 255, 100, step=1, label="threshold1")
            c["high_threshold"] = _field(e, "high_threshold", gr.Slider, 0, 255, 200, step=1, label="threshold2")
            c["blur"] = _field(e, "blur", gr.Number, 0, precision=0, label="Blur radius (odd, 0: none)")
            c["control_size"] = _field(e, "control_size", gr.Number, 512, precision=0, label="control_size")
            c["shard_size"] = _field(e, "shard_size", gr.Number, 1000, precision=0, label="Samples per shard")
    inputs = [c[name] for name in DATASET_FIELDS]
    errors = [e[name] for name in DATASET_FIELDS]
    with gr.Row():
        with gr.Column():
            sample = gr.Slider(0, 1, 0, step=1, label="Sample", elem_id="ds-sample")
            load = gr.Button("Preview", elem_id="ds-preview-button")
            counts = gr.Markdown("", elem_id="ds-counts")
        preview = gr.Image(label="image | hint", type="numpy", interactive=False, elem_id="ds-preview", format="png")
    previewed = dict(fn=app.preview, inputs=[sample, *inputs], outputs=[preview, counts, sample, *errors])
    load.click(**previewed)
    # User edits only (.input): the picker's own update by the preview must not trigger another.
    for component in (c["low_threshold"], c["high_threshold"], c["blur"], c["control_size"], sample, c["control_type"]):
        component.input(**previewed, trigger_mode="always_last")
    gr.Markdown("### Precompute Canny for dataset")
    out = gr.Textbox(label="Job output", interactive=False, elem_id="ds-job-out")
    with gr.Row():
        start = gr.Button("Precompute Canny for dataset", variant="primary", elem_id="ds-start")
        cancel = gr.Button("Cancel", elem_id="ds-cancel")
        resume = gr.Button("Resume", elem_id="ds-resume")
    bar = gr.HTML("", elem_id="ds-bar")
    status = gr.Markdown("", elem_id="ds-status")  # the job's state, from the timer
    message = gr.Markdown("", elem_id="ds-message")  # what the last button did (the timer never overwrites it)
    skipped = gr.Dataframe(headers=["file", "reason"], label="Skipped files", elem_id="ds-skipped", interactive=False)
    start.click(app.start_prep, inputs, [out, message, bar, *errors])
    cancel.click(app.cancel_prep, [out], [message])
    resume.click(app.resume_prep, [out], [message])
    gr.Timer(1.0).tick(app.prep_status, [out], [bar, status, skipped])
    return c


def runs_tab(app: App) -> None:
    e: dict[str, gr.Markdown] = {}
    gr.Markdown("## New run")
    with gr.Row():
        with gr.Column():
            name = _field(e, "run_name", gr.Textbox, label="Run name")
            known = [d["path"] for d in ds.list_datasets(app.roots)]
            label = "Dataset (empty: generated shapes)"
            dataset = _field(e, "dataset", gr.Dropdown, known, allow_custom_value=True, label=label)
            model = _field(e, "model", gr.Dropdown, list(MODELS), value="tiny", label="Model")
            model_path = _field(e, "model_path", gr.Textbox, label="Local model path (local_*)")
        with gr.Column():
            steps = _field(e, "steps", gr.Number, 600, precision=0, label="Steps")
            batch = _field(e, "batch_size", gr.Number, 8, precision=0, label="Batch size")
            lr = _field(e, "learning_rate", gr.Number, 1e-4, label="Learning rate")
            precision = _field(e, "precision", gr.Dropdown, list(PRECISIONS), value="32", label="Precision")
            every = _field(e, "checkpoint_every", gr.Number, 200, precision=0, label="Checkpoint every N steps")
            extra = _field(e, "extra", gr.Textbox, label="More overrides (key=value ...)")
    start = gr.Button("Start run", variant="primary", elem_id="run-start")
    message = gr.Markdown("", elem_id="run-message")
    gr.Markdown("## Runs")
    with gr.Row():
        run = gr.Dropdown(app.run_choices(), label="Run", elem_id="run-pick", allow_custom_value=False)
        stop = gr.Button("Stop (checkpoint, then exit)", elem_id="run-stop")
        resume = gr.Button("Resume", elem_id="run-resume")
    state = gr.Markdown("", elem_id="run-state")
    with gr.Row():
        loss = gr.LinePlot(x="step", y="loss", title="training loss", elem_id="run-loss", height=260)
        grid = gr.Image(label="latest validation grid", type="filepath", interactive=False, elem_id="run-grid")
    metrics = gr.Dataframe(label="hint-following metrics (samples/metrics.jsonl)", elem_id="run-metrics")
    log_tail = gr.Textbox(label="log", lines=8, interactive=False, elem_id="run-log")
    fields = [name, dataset, model, model_path, steps, batch, lr, precision, every, extra]
    start.click(app.start_run, fields, [message, run, *[e[f] for f in RUN_FIELDS]])
    stop.click(app.stop_run, [run], [message])
    resume.click(app.resume_run, [run], [message])
    gr.Timer(2.0).tick(app.run_status, [run], [run, state, loss, grid, metrics, log_tail])


def generate_tab(app: App, c: dict) -> None:
    gr.Markdown("## Generate (Canny with the Datasets tab's thresholds and blur)")
    with gr.Row():
        with gr.Column():
            controlnet = gr.Dropdown(app.run_choices(), allow_custom_value=True, label="Run or exported ControlNet",
                                     elem_id="gen-controlnet")  # fmt: skip
            kind = gr.Radio(["image", "hint"], value="image", label="Upload is", elem_id="gen-kind")
            upload = gr.Image(label="image or hint", type="numpy", elem_id="gen-upload")
            prompt = gr.Textbox(label="Prompt", elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
            scale = gr.Slider(0, 2, 1.0, step=0.05, label="Control scale", elem_id="gen-scale")
            guidance = gr.Slider(1, 15, 7.5, step=0.5, label="Guidance", elem_id="gen-guidance")
            steps = gr.Number(20, precision=0, label="Steps", elem_id="gen-steps")
            seed = gr.Number(0, precision=0, label="Seed", elem_id="gen-seed")
            go = gr.Button("Generate", variant="primary", elem_id="gen-go")
        with gr.Column():
            hint = gr.Image(label="hint", interactive=False, elem_id="gen-hint", format="png")
            images = gr.Gallery(label="images", elem_id="gen-images", format="png")
            message = gr.Markdown("", elem_id="gen-message")
    inputs = [controlnet, kind, upload, prompt, negative, scale, guidance, steps, seed,
              c["low_threshold"], c["high_threshold"], c["blur"]]  # fmt: skip
    go.click(app.generate, inputs, [images, hint, message])
    controlnet.change(app.guidance_for, [controlnet], [guidance])  # the family's default: SD 7.5, SD3 7, Flux 3.5
    controlnet.focus(lambda: gr.update(choices=app.run_choices()), None, [controlnet])

