"""The run's record: log.txt (what play.ipynb plots and --resume trims), stdout, and W&B with --wandb."""
import os

from errors import UsageError


class Logger:
    """One line per event on stdout and, as `step stream value`, in log_dir/log.txt (appended, never wiped);
    with --wandb the same events, the step line's other figures and the samples also go to a W&B run."""

    def __init__(self, log_dir, enabled, wandb_project=None, config=None, resume=False):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "log.txt")
        self.header = ""  # written with the first event: a run that fails before any leaves no log.txt
        self.wandb = open_wandb(wandb_project, log_dir, config, resume) if enabled and wandb_project else None

    def start_at(self, step, tokens_per_step):
        """Drop the lines of steps >= step: a killed run logged them after its last checkpoint (the last
        one perhaps cut short), and the resumed run logs them again. Each step then appears once."""
        if step == 0:
            self.header = f"0 tokens_per_step {tokens_per_step}\n"  # play.ipynb reads it for its tokens axis
        if not self.enabled or not os.path.exists(self.path):
            return
        def before(line):
            parts = line.split()
            return line.endswith("\n") and len(parts) == 3 and parts[0].isdigit() and int(parts[0]) < step
        with open(self.path) as f:
            kept = [line for line in f if before(line)]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)  # a kill during the rewrite leaves the old log or the new one

    def print(self, *args):
        if self.enabled:
            print(*args, flush=True)

    def log(self, step, stream, value, fmt):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(self.header + f"{step} {stream} {value:{fmt}}\n")
            self.header = ""
        self.figures(step, **{stream: value})

    def figures(self, step, **values):
        """Figures for W&B only (the step line prints them; log.txt keeps the streams above)."""
        if self.wandb is not None:
            # W&B drops a step lower than the run's last: after --resume, the steps a killed run had logged
            # past its checkpoint, which the resumed run repeats exactly (only their timings differ)
            self.wandb.log(values, step=step)

    def samples(self, step, texts):
        self.print("\n".join(f"sample {i}: {text!r}" for i, text in enumerate(texts)))
        if self.wandb is not None:
            import wandb
            self.wandb.log({"samples": wandb.Table(columns=["sample", "text"], data=list(enumerate(texts)))},
                           step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def open_wandb(project, log_dir, config, resume):
    """The W&B run of this log_dir: its id is kept in log_dir/wandb_id, so --resume goes on logging to it."""
    import wandb
    id_file = os.path.join(log_dir, "wandb_id")
    run_id = (open(id_file).read().strip() if resume and os.path.exists(id_file)
              else None)  # None: W&B picks one
    try:
        # dir: its files (all of them, under WANDB_MODE=offline) go to log_dir/wandb/, beside log.txt
        run = wandb.init(project=project, id=run_id, resume="allow" if run_id else None, dir=log_dir,
                         config=config, name=os.path.basename(os.path.abspath(log_dir)))
    except wandb.errors.Error as e:
        raise UsageError(f"--wandb {project}: W&B did not start ({str(e).strip().splitlines()[0][:200]}); "
                         "run `wandb login`, or set WANDB_MODE=offline to log to files only") from None
    with open(id_file + ".tmp", "w") as f:
        f.write(run.id + "\n")
    os.replace(id_file + ".tmp", id_file)  # a kill mid-write leaves the old id or the new, never half of one
    return run
