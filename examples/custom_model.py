"""Distil with your own network, without writing a plugin package.

A model is any ``nn.Module`` with ``forward`` (logits) and ``embed``
(features before the classifier), registered under a name. Here a plugin
object passed to ``Engine(plugins=...)`` registers it for this run only.

    python examples/custom_model.py
"""

from torch import nn

import astkit


class TinyCNN(nn.Module):
    """One conv layer, instance norm, global average pool, linear classifier."""

    def __init__(self, channels, num_classes, image_size, width=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x):
        return self.features(x)

    def forward(self, x):
        return self.classifier(self.embed(x))


class TinyCNNPlugin:
    astkit_plugin_name = "tiny-cnn"

    @astkit.hookimpl
    def astkit_register_models(self, register):
        register("tiny-cnn", TinyCNN)


if __name__ == "__main__":
    config = astkit.RunConfig.load(overrides=[
        "out=runs/example-custom-model", "model.name=tiny-cnn", "model.width=16",
        "experts.num_experts=2", "experts.epochs=6", "distill.ipc=5", "distill.iterations=20",
        "distill.syn_steps=5", "distill.max_start_epoch=3", "distill.lr_img=100",
        "evaluate.epochs=100", "evaluate.num_nets=2",
    ])
    result = astkit.Engine(config, plugins=[TinyCNNPlugin()]).run()
    acc = result.evaluation["tiny-cnn"]
    print(f"tiny-cnn on digits, ipc 5: {acc.mean:.4f} ± {acc.std:.4f}")
