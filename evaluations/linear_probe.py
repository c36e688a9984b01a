r"""Linear probe of a trained model's global features (arXiv 2512.21867, Table 7).

    python -m evaluations.linear_probe --experiment_dir RUN --store data/imagenet256_tokens \
        --val-store data/imagenet256_val_tokens --max-images 128000
    python -m evaluations.linear_probe --experiment_dir assets/demo/dpar --store assets/demo/tokens --val-holdout 200

Features, as the paper describes them: the last hidden layer of the global transformer (DPAR: its outputs
at the patch positions, with the boundaries the run's patcher gives, entropy model included; the GPT: its
outputs at the token positions), average-pooled per image. The model reads the null class, so no feature
sees the label. One view per image: the store's center crop (``tokenizer.transforms.center_view``).

Recipe: standardised features (scikit-learn's ``StandardScaler``), then multinomial logistic regression
(``LogisticRegression``, L-BFGS, L2 with ``--C``, up to ``--max-iter`` iterations) fitted on the training
images; top-1 / top-5 accuracy on held-out images: ``--val-store``, else a class-stratified draw of
``--val-holdout`` images of ``--store`` (``dpar.data.splits.holdout_split``, seed ``--split-seed``).
Prints one line and, with ``--output``, writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from dpar.data.preprocess import next_token_entropies
from dpar.data.splits import holdout_problem, holdout_split, stratified_sample
from dpar.config import REPO
from dpar.data.store import META_FILE, TokenStore, read_meta
from dpar.errors import ArgumentParser, UserError, run_main
from dpar.fileio import atomic_write_text, check_output_file, claim_output
from dpar.patcher import patch_starts
from dpar.runs import Sampler
from dpar.validation import device, epoch_choice, number
from tokenizer.transforms import center_view

DEMO_STORE = REPO / "assets" / "demo" / "tokens"  # the embedded demo's token store (python -m dpar.demo)


@torch.no_grad()
def pooled_features(sampler: Sampler, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` tokens -> ``[B, dim]`` fp32 features of the run's model at its null class (see module doc)."""
    model = sampler.model
    null = model.cls_embedding.null_labels(len(tokens), tokens.device)
    if sampler.patcher is None:
        return model.pooled_features(tokens, null).float()
    entropies = (next_token_entropies(sampler.entropy_model, tokens) if sampler.patcher.mode == "entropy"
                 else torch.zeros(tokens.shape, device=tokens.device))
    starts = patch_starts(sampler.patcher, entropies, sampler.grid)
    return model.pooled_features(tokens, null, starts).float()


def open_store(flag: str, path: str) -> TokenStore:
    """The token store ``flag`` names; where there is none, one line saying what makes one (the probe reads
    only tokens and labels: the tokens stage is enough) and naming the demo's store, which every clone has."""
    if not Path(path).is_file() and read_meta(Path(path)) is None:
        demo = os.path.relpath(DEMO_STORE)
        raise UserError(f"{flag} {path}: no token store there (no {META_FILE}); make one from an image folder with "
                        f"python preprocess_tokens.py --stage tokens --data-path <images> --store {path} --vq-ckpt "
                        f"<tokenizer>, or probe the demo's: {flag} {demo}")
    return TokenStore(path)


def center_tokens(store: TokenStore, indices: np.ndarray) -> np.ndarray:
    """uint16 ``[len(indices), N]``: the center-crop view of the store's images ``indices``, each checked
    against the codebook (``TokenStore.tokens``), so that a damaged store stops before any model work."""
    view = center_view(store.views)
    return np.stack([store.tokens(int(i))[view] for i in indices]).reshape(len(indices), store.num_tokens)


def features(sampler: Sampler, tokens: np.ndarray, batch_size: int, desc: str) -> np.ndarray:
    """``[len(tokens), dim]`` fp32 features of ``tokens [I, N]``, ``batch_size`` images per forward."""
    device = next(sampler.model.parameters()).device
    out = [np.zeros((0, sampler.model.config.dim), dtype=np.float32)]
    for start in tqdm(range(0, len(tokens), batch_size), desc=desc, unit="batch", leave=False):
        batch = torch.from_numpy(tokens[start:start + batch_size].astype(np.int64)).to(device)
        out.append(pooled_features(sampler, batch).cpu().numpy())
    return np.concatenate(out)


def top_k_accuracy(probabilities: np.ndarray, classes: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of ``labels`` among the ``k`` most probable ``classes`` (columns of ``probabilities``)."""
    top = classes[np.argsort(-probabilities, axis=1)[:, :k]]
    return float((top == labels[:, None]).any(axis=1).mean())


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, C: float,
              max_iter: int) -> dict:
    """The recipe above; returns top-1, top-5 and whether L-BFGS converged."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(train_x, train_y)
    probabilities = probe.predict_proba(val_x)
    classes = probe.classes_
    return {"top1": top_k_accuracy(probabilities, classes, val_y, 1),
            "top5": top_k_accuracy(probabilities, classes, val_y, 5),
            "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught)}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment_dir", "--experiment-dir", required=True, help="a DPAR or GPT training run")
    parser.add_argument("--epoch", type=epoch_choice, default=None, help="checkpoint epoch or 'latest' (default: "
                                                                          "the newest epoch)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    parser.add_argument("--store", required=True, help="token store of the training images")
    parser.add_argument("--val-store", default=None, help="token store of the held-out images (default: a "
                                                          "stratified hold-out of --store)")
    parser.add_argument("--val-holdout", type=number(int, min=1), default=None,
                        help="held-out images drawn from --store without --val-store (default: 20%%)")
    parser.add_argument("--split-seed", type=number(int, min=0), default=0)
    parser.add_argument("--max-images", type=number(int, min=0), default=0,
                        help="fit on a stratified sample of this many training images (0: all)")
    parser.add_argument("--C", type=number(float, gt=0), default=1.0, help="inverse L2 strength")
    parser.add_argument("--max-iter", type=number(int, min=1), default=1000, help="L-BFGS iterations")
    parser.add_argument("--batch-size", type=number(int, min=1), default=64)
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="also write the result here as JSON")
    args = parser.parse_args(argv)
    if args.val_store is not None and args.val_holdout is not None:
        raise UserError("--val-holdout draws held-out images from --store; with --val-store give one of the two")
    if args.output is not None:
        check_output_file(args.output, "--output")

    stores = {"--store": open_store("--store", args.store)}
    if args.val_store is not None:
        stores["--val-store"] = open_store("--val-store", args.val_store)
    sampler = Sampler.from_experiment(args.experiment_dir, args.epoch, ema=args.ema, device=args.device,
                                      tokenizer=False)
    if sampler.model_config.class_dropout_prob == 0:
        raise UserError(f"--experiment_dir {args.experiment_dir}: the model has no null class (model."
                        "class_dropout_prob 0), and its class input would give the label away")
    for flag, store in stores.items():
        if store.grid != sampler.grid or store.codebook_size != sampler.model_config.vocab_size:
            raise UserError(f"{flag} {store.path} holds {store.grid}x{store.grid} tokens of a {store.codebook_size}-"
                            f"code tokenizer; the model reads {sampler.grid}x{sampler.grid} of "
                            f"{sampler.model_config.vocab_size}")
    train_store = stores["--store"]
    labels = train_store.labels.astype(np.int64)
    if args.val_store is None:
        holdout = args.val_holdout if args.val_holdout is not None else max(1, len(labels) // 5)
        problem = holdout_problem(labels, holdout)
        if problem is not None:
            raise UserError(f"--val-holdout {holdout}: {problem}")
        train, val = holdout_split(labels, holdout, args.split_seed)
        val_store, val_labels = train_store, labels[val]
    else:
        train, val = np.arange(len(labels)), np.arange(len(stores["--val-store"]))
        val_store = stores["--val-store"]
        val_labels = val_store.labels.astype(np.int64)
    if len(val) == 0:
        raise UserError(f"--val-store {args.val_store} holds no images")
    if args.max_images and args.max_images < len(train):
        train = train[stratified_sample(labels[train], args.max_images, args.split_seed)]
    if len(np.unique(labels[train])) < 2:
        source = f"--max-images {args.max_images}" if args.max_images else f"--store {args.store}"
        raise UserError(f"{source}: the training images hold {len(np.unique(labels[train]))} class; a classifier "
                        "needs two or more")

    if args.output is not None:
        claim_output(args.output, "--output")
    train_tokens, val_tokens = center_tokens(train_store, train), center_tokens(val_store, val)
    train_x = features(sampler, train_tokens, args.batch_size, "train features")
    val_x = features(sampler, val_tokens, args.batch_size, "held-out features")
    result = fit_probe(train_x, labels[train], val_x, val_labels, args.C, args.max_iter)
    result = {"experiment_dir": str(args.experiment_dir), "weights": str(sampler.weights), "model":
              sampler.model_config.gpt_model, "feature_dim": int(train_x.shape[1]), "train_images": len(train),
              "val_images": len(val), "classes": int(len(np.unique(labels[train]))), **result}
    warning = "" if result["converged"] else f" (L-BFGS did not converge in {args.max_iter} iterations)"
    print(f"linear probe of {result['model']} ({result['weights']}): top-1 {100 * result['top1']:.1f}%, top-5 "
          f"{100 * result['top5']:.1f}% on {result['val_images']} held-out images, {result['classes']} classes, "
          f"fitted on {result['train_images']}{warning}")
    if args.output is not None:
        atomic_write_text(args.output, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    run_main(main)
