"""The LightningModule of the Lightning tests (tests/integrations/test_lightning.py and the 2-process
script tests/integrations/lightning_ddp.py): a classifier around ``net()`` trained by the optimizer
``make_opt(net)`` returns, in automatic or manual optimization."""
import torch.nn.functional as F


def module_class(net, make_opt, manual: bool, val_out=lambda loss: loss):
    """A LightningModule class: cross-entropy on ``net()``; ``validation_step`` returns
    ``val_out(loss)``; ``configure_optimizers`` returns ``make_opt(self.net)``."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            if not manual:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

        def validation_step(self, batch, batch_idx):
            x, y = batch
            return val_out(F.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            # built from the unwrapped module, as every framework does (under DDP: the default group)
            return make_opt(self.net)

    return Module
