"""The retrievers' training loss: cross-entropy over all item scores, fused with the output layer
(NextItemModel.next_item_loss)."""

import torch


class ScoreCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight^T + bias, target_i), fused; target_i is 1 - smoothing on label_i plus
    smoothing spread evenly over the real items (columns 1..; none on the padding column 0).

    The [positions, items] logits are the largest tensors of a training step, so every pass over them counts.
    The standard path makes about eight (logits, log-softmax, loss, a zero-filled gradient, its softmax, ...)
    and two exponentials. Here the forward turns the logits in place into e = exp(logits - rowmax) (four passes,
    one exponential) and keeps e with its row sums s. The backward needs no elementwise pass: the gradient
    e / s - target is applied through the two matmuls (and a matrix-vector product for the bias), with 1/s
    folded into their small [positions, d] operand or result and the label and smoothing terms added on the
    small side. The smoothing term needs the mean logit over the items,
    which is hidden @ mean(weight[1:]) + mean(bias[1:]): no pass over the logits either.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, smoothing):  # noqa: ANN001, ANN205 - autograd.Function signature
        logits = (hidden @ weight.t()).add_(bias)  # not addmm: slower on CPU (docs/performance.md)
        target = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        if smoothing:
            mean_logit = hidden @ weight[1:].mean(0) + bias[1:].mean()
            target = (1 - smoothing) * target + smoothing * mean_logit
        row_max = logits.amax(1, keepdim=True)
        exp = logits.sub_(row_max).exp_()
        row_sum = exp.sum(1)
        loss = (row_max.squeeze(1) + row_sum.log() - target).mean()
        ctx.smoothing = smoothing
        ctx.save_for_backward(hidden, weight, exp, row_sum, labels)
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        hidden, weight, exp, row_sum, labels = ctx.saved_tensors
        smoothing, n, num_columns = ctx.smoothing, len(labels), weight.shape[0]
        scale = grad / n
        row_scale = (scale / row_sum).unsqueeze(1)  # softmax = exp / row_sum, times dloss/dlogits' 1/n
        label_scale = -(1 - smoothing) * scale
        grad_hidden = (exp @ weight).mul_(row_scale)
        grad_hidden.add_(weight[labels], alpha=label_scale)
        grad_weight = exp.t() @ (hidden * row_scale)
        grad_bias = row_scale.squeeze(1) @ exp
        grad_weight.index_add_(0, labels, hidden, alpha=label_scale)
        grad_bias.index_add_(0, labels, torch.full_like(row_sum, label_scale))
        if smoothing:
            share = smoothing * scale / (num_columns - 1)  # each real item's share of the smoothing target
            grad_hidden.sub_(weight[1:].mean(0), alpha=smoothing * scale)
            grad_weight[1:].sub_(hidden.sum(0), alpha=share)
            grad_bias[1:].sub_(share * n)
        return grad_hidden, grad_weight, grad_bias, None, None
