"""Representative initialisation (AST, Sec. IV-C1).

Random real images can be outliers. AST embeds every real image of a class
with a trained expert, runs K-Means, and starts from the real images nearest
the centroids. Paper: features before the classifier, ``K = ipc`` clusters
and the nearest image to each; at ipc 50, 10 clusters and the 5 nearest to
each. Authors' code ("reference"): the logits as features, 10 clusters and
``ipc / 10`` images per centroid (which selects nothing for ipc < 10; astkit
falls back to ``K = ipc`` there, as the authors' earlier revision did).
Optionally writes a PNG of the PCA view of the features (paper Fig. 10).
"""

from __future__ import annotations

from pathlib import Path

import torch
from sklearn.cluster import KMeans

from astkit import UserError, atomic_write, hookimpl

NAME = "representative-init"


def select_representatives(features: torch.Tensor, ipc: int, clusters: int, seed: int) -> torch.Tensor:
    """Indices (into ``features``) of ``ipc`` images: ``ipc / clusters`` nearest
    to each of ``clusters`` K-Means centroids, all distinct, cluster by cluster."""
    if clusters < 1 or ipc % clusters:
        raise UserError(f"{NAME}: ipc {ipc} is not a multiple of the number of clusters {clusters}")
    per_cluster = ipc // clusters
    x = features.double().numpy()
    kmeans = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(x)
    centres = torch.from_numpy(kmeans.cluster_centers_)
    distances = torch.cdist(centres, features.double())
    chosen: list[int] = []
    for row in distances:
        for index in row.argsort().tolist():
            if index not in chosen:
                chosen.append(index)
                if len(chosen) % per_cluster == 0:
                    break
    return torch.tensor(chosen, dtype=torch.long)


def cluster_count(ipc: int, option: int, variant: str) -> int:
    """How many clusters to use for ``ipc`` images per class."""
    if option:
        return option
    if variant == "reference" and ipc >= 10 and ipc % 10 == 0:
        return 10
    if variant == "paper" and ipc == 50:
        return 10
    return ipc


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, features: str, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (``model.embed``) or logits of ``images``."""
    model.eval()
    device = next(model.parameters()).device
    fn = model.embed if features == "penultimate" else model
    out = [fn(images[i : i + batch_size].to(device)).flatten(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@hookimpl
def astkit_plugin_options():
    return {NAME: {"variant": "paper", "features": None, "clusters": 0, "expert": 0, "pca_png": ""}}


@hookimpl
def astkit_init_synthetic(dataset, ipc, experts, config):
    options = config.plugin(NAME)
    variant = options["variant"]
    if variant not in ("paper", "reference"):
        raise UserError(f"{NAME}.variant must be 'paper' or 'reference', got {variant!r}")
    features = options["features"] or ("penultimate" if variant == "paper" else "logits")
    if features not in ("penultimate", "logits"):
        raise UserError(f"{NAME}.features must be 'penultimate' or 'logits', got {features!r}")
    if not experts:
        raise UserError(f"{NAME} needs a trained expert; train experts first")
    index = int(options["expert"])
    if not 0 <= index < len(experts):
        raise UserError(f"{NAME}.expert = {index} but the run has {len(experts)} experts")
    model = experts[index].build_model(-1)
    clusters = cluster_count(ipc, int(options["clusters"]), variant)
    images, labels, views = [], [], []
    for label, indices in enumerate(dataset.class_indices()):
        feats = embed(model, dataset.train_images[indices], features)
        chosen = select_representatives(feats, ipc, clusters, seed=(config.seed + label) % 2**32)  # K-Means: < 2**32
        images.append(dataset.train_images[indices[chosen]])
        labels.append(torch.full((ipc,), label, dtype=torch.long))
        views.append((feats, chosen))
    if options["pca_png"]:
        plot_pca(views, dataset.class_names, Path(options["pca_png"]))
    return torch.cat(images).clone(), torch.cat(labels)


def plot_pca(views, class_names, path: Path, max_classes: int = 5) -> None:
    """Paper Fig. 10: each class's features in 2-D (PCA), chosen images marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    shown = views[:max_classes]
    fig, axes = plt.subplots(1, len(shown), figsize=(3 * len(shown), 3), squeeze=False)
    for ax, (feats, chosen), name in zip(axes[0], shown, class_names):
        xy = PCA(n_components=2).fit_transform(feats.double().numpy())
        ax.scatter(xy[:, 0], xy[:, 1], s=4, c="lightgray")
        ax.scatter(xy[chosen, 0], xy[chosen, 1], s=30, c="crimson", marker="*")
        ax.set_title(str(name), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
