import torch

from wsol_bench.methods import Explainer


class TokenNorm(Explainer):
    """Map = L2 norm of each patch token after the last block (class-agnostic)."""
    class_specific = False

    def __init__(self, model, power: float = 1.0):
        super().__init__(model)          # checks the class token, reads grid and prefix tokens
        self.power = power

    @torch.no_grad()
    def explain(self, images, targets):
        """Patch-grid maps, logits and the targets used."""
        tokens = self.model.forward_features(images)
        logits = self.model.forward_head(tokens)
        used = self.resolve_targets(logits, targets)   # given targets, else predicted
        return self.patch_map(tokens.norm(dim=-1) ** self.power), logits, used
