"""The tracer's rules for the ops that carry weights or mix positions: contractions (matmul, linear, their
fused forms), embeddings, per-channel norms, convolutions and pooling, and attention (scaled dot-product,
``nn.MultiheadAttention``). The elementwise, shape and reduction rules are in :mod:`.rules`."""
from __future__ import annotations

import torch

from .core import Info, OpRecord, Tracer, _outputs, _tensors, align, rule, squeeze_label
from .rules import meet


def _contract(tr: Tracer, a: torch.Tensor, ia: Info | None, b: torch.Tensor, ib: Info | None,
              out: torch.Tensor) -> None:
    """``a @ b`` with torch.matmul's broadcasting: join the contracted axis, carry the rest (see module
    doc)."""
    va = a.dim() == 1
    vb = b.dim() == 1
    nd = max(a.dim() + va, b.dim() + vb, 2)
    la = [align(lab.unsqueeze(0) if va else lab, nd) for lab in (ia.labels if ia else [])]
    lb = [align(lab.unsqueeze(-1) if vb else lab, nd) for lab in (ib.labels if ib else [])]
    a_param, b_param = ia is not None and ia.param, ib is not None and ib.param
    act = not (a_param and b_param)  # an unlabelled operand that is not a parameter is data
    for x in la:
        if x.shape[-1] == 1:
            continue
        for y in lb:
            if y.shape[-2] > 1:
                tr.g.join_shared(x.unsqueeze(-1), y.unsqueeze(-3))
                if not a_param and b_param:
                    tr.g.role(y, "consumer")
                if a_param and not b_param:
                    tr.g.role(x, "consumer")
    outs: list[tuple[torch.Tensor, bool]] = []
    weight = a_param != b_param  # activations times a weight
    for x, is_param, from_a in [(x, a_param, True) for x in la] + [(y, b_param, False) for y in lb]:
        k_axis = -1 if from_a else -2
        if x.shape[k_axis] > 1:
            kept = [d for d in range(nd) if d - nd != k_axis and x.shape[d] > 1]
            if not kept or (weight and not is_param):
                continue  # consumed: a weight's contraction makes new channels
            first = x.narrow(k_axis, 0, 1)  # q @ k^T: a head's dims are one unit with the head
            tr.g.join(first, x)
            x = first
        outs.append((x, is_param))  # a: [.., n, 1]; b: [.., 1, m]: both broadcast to [.., n, m]
    if not outs:
        return
    if vb:
        outs = [(x.squeeze(-1), p) for x, p in outs]
    if va:
        outs = [(x.squeeze(-2) if x.dim() > 1 else x, p) for x, p in outs]
    if act:
        for x, is_param in outs:
            if is_param:
                tr.g.role(x, "producer")
        info = meet(tr, [Info([align(x, out.dim())]) for x, _ in outs], out.dim())
    else:
        info = Info([squeeze_label(align(x, out.dim())) for x, _ in outs], param=True)
    tr.set(out, info)


@rule("matmul", "mm", "bmm", "rmatmul")
def _matmul(tr, name, func, args, kwargs, out):
    a, b = (args[1], args[0]) if name == "rmatmul" else (args[0], args[1])
    if id(b) in tr.params and b.dim() == 2:
        tr.g.records.append(OpRecord("matmul", tr.g.nodes.names[id(b)], (0, 1),
                                     (tuple(a.shape), tuple(b.shape))))
    _contract(tr, a, tr.of(a), b, tr.of(b), out)


@rule("addmm", "baddbmm", "addbmm")
def _addmm(tr, name, func, args, kwargs, out):
    # positional or by name (Bloom calls alibi.baddbmm(batch1=..., batch2=..., beta=..., alpha=...))
    names = ("input", "mat1", "mat2") if name == "addmm" else ("input", "batch1", "batch2")
    c, a, b = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
    if id(b) in tr.params and b.dim() == 2:  # transformers' Conv1D: x @ W with W [in, out]
        tr.g.records.append(OpRecord("matmul", tr.g.nodes.names[id(b)], (0, 1),
                                     (tuple(a.shape), tuple(b.shape))))
    tmp = torch.empty(out.shape)
    _contract(tr, a, tr.of(a), b, tr.of(b), tmp)
    infos = [tr.info.get(id(tmp)), tr.of(c)]
    tr.set(out, meet(tr, infos, out.dim()))
    if tr.of(c) is not None and tr.of(c).param:
        for lab in tr.of(c).labels:
            tr.g.role(lab, "producer")


@rule("linear")
def _linear(tr, name, func, args, kwargs, out):
    x = args[0]
    w = kwargs.get("weight", args[1] if len(args) > 1 else None)
    b = kwargs.get("bias", args[2] if len(args) > 2 else None)
    iw = tr.of(w)
    wt = Info([lab.transpose(-1, -2) for lab in iw.labels], param=iw.param) if iw and w.dim() == 2 else iw
    tmp = torch.empty(out.shape)
    _contract(tr, x, tr.of(x), w.t() if w.dim() == 2 else w, wt, tmp)
    ib = tr.of(b)
    tr.set(out, meet(tr, [tr.info.get(id(tmp)), ib], out.dim()))
    if ib is not None and ib.param:
        for lab in ib.labels:
            tr.g.role(lab, "producer")
    if id(w) in tr.params and w.dim() == 2:
        tr.g.records.append(OpRecord("matmul", tr.g.nodes.names[id(w)], (1, 0),
                                     (tuple(x.shape), tuple(w.shape))))


@rule("embedding")
def _embedding(tr, name, func, args, kwargs, out):
    w = args[1] if len(args) > 1 else kwargs["weight"]
    iw = tr.of(w)
    if iw is None or not iw.param:
        return
    cols = [lab for lab in iw.labels if lab.dim() == 2 and lab.shape[1] > 1]
    for lab in iw.labels:
        if lab.dim() == 2 and lab.shape[0] > 1:
            tr.g.role(lab, "rows")
    if cols:
        lab = align(cols[0].reshape(-1), out.dim())
        tr.g.role(lab, "producer")
        tr.g.role(lab, "embedding")
        tr.set(out, Info([lab]))


def _channel_param(tr: Tracer, t, ndim: int, axis: int) -> torch.Tensor | None:
    """A 1-D per-channel parameter/buffer as a label along ``axis`` of an ``ndim``-axis tensor."""
    i = tr.of(t, buffer=True)
    if i is None or not i.labels:
        return None
    lab = i.labels[0].reshape(-1)
    shape = [1] * ndim
    shape[axis] = lab.numel()
    return lab.reshape(shape)


def _per_channel(tr: Tracer, x, out, params, axis: int, join_axes=()) -> None:
    info = tr.of(x)
    lab = align(info.labels[0], x.dim()) if info is not None and not info.param else None
    if lab is not None:
        for d in join_axes:
            if lab.shape[d] > 1:
                first = lab.narrow(d, 0, 1)
                tr.g.join(first, lab)
                lab = first
    out_lab = lab
    for p in params:
        pl = _channel_param(tr, p, x.dim(), axis)
        if pl is None:
            continue
        tr.g.role(pl, "channel")
        if out_lab is None:
            out_lab = pl
        else:
            tr.g.join(out_lab, pl)
            a, b = torch.broadcast_tensors(out_lab, pl)
            out_lab = torch.where(a >= 0, a, b)
    if out_lab is not None:
        tr.set(out, Info([squeeze_label(out_lab)]))


@rule("batch_norm", "instance_norm")
def _batch_norm(tr, name, func, args, kwargs, out):
    """``(input, running_mean, running_var, weight, bias, ...)``: per-channel parameters and statistics."""
    x = args[0]
    names = ("running_mean", "running_var", "weight", "bias")
    params = [kwargs.get(n, args[i + 1] if len(args) > i + 1 else None) for i, n in enumerate(names)]
    _per_channel(tr, x, out, [p for p in params if isinstance(p, torch.Tensor)], axis=1,
                 join_axes=range(2, x.dim()))


@rule("layer_norm", "rms_norm")
def _layer_norm(tr, name, func, args, kwargs, out):
    x = args[0]
    shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    w = kwargs.get("weight", args[2] if len(args) > 2 else None)
    b = kwargs.get("bias", args[3] if len(args) > 3 else None) if name == "layer_norm" else None
    info = tr.of(x)
    if info is not None and not info.param:
        lab = align(info.labels[0], x.dim())
        for d in range(x.dim() - k, x.dim()):
            if lab.shape[d] > 1:
                tr.g.tie(lab.narrow(d, 0, 1), lab, name)
    _per_channel(tr, x, out, [p for p in (w, b) if isinstance(p, torch.Tensor)], axis=x.dim() - 1)


@rule("group_norm")
def _group_norm(tr, name, func, args, kwargs, out):
    x = args[0]
    w = kwargs.get("weight", args[2] if len(args) > 2 else None)
    b = kwargs.get("bias", args[3] if len(args) > 3 else None)
    _per_channel(tr, x, out, [p for p in (w, b) if isinstance(p, torch.Tensor)], axis=1,
                 join_axes=range(1, x.dim()))


@rule("conv1d", "conv2d", "conv3d")
def _conv(tr, name, func, args, kwargs, out):
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    b = kwargs.get("bias", args[2] if len(args) > 2 else None)
    groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
    ix, iw = tr.of(x), tr.of(w)
    nd = out.dim()
    if iw is None or not iw.param:
        if ix is not None:
            for lab in ix.labels:
                tr.g.block(lab, f"{name} with a computed kernel")
        return
    name_w = tr.g.nodes.names[id(w)]
    o, cg = w.shape[0], w.shape[1]
    rows = tr.g.nodes.axis(name_w, 0, o)
    shape = [1] * nd
    shape[1] = o
    out_lab = rows.reshape(shape)
    tr.g.role(out_lab, "producer")
    if ix is not None and not ix.param:
        lab = align(ix.labels[0], x.dim())
        for d in range(2, x.dim()):  # a label that varies over space: every output position mixes it
            if lab.shape[d] > 1:
                first = lab.narrow(d, 0, 1)
                tr.g.join(first, lab)
                lab = first
        ch = lab.reshape(-1) if lab.numel() == lab.shape[1] else None
        if ch is None:
            tr.g.block(lab, f"{name}: channels that vary along the batch axis")
        elif groups == 1:
            cols = tr.g.nodes.axis(name_w, 1, cg)
            tr.g.join(ch.expand(cg) if ch.numel() == 1 else ch, cols)
            tr.g.role(cols, "consumer")
        else:  # a grouped or depthwise conv: a group's input channels and output channels go together
            og = o // groups
            chx = ch.expand(x.shape[1]) if ch.numel() == 1 else ch
            for gi in range(groups):
                tr.g.join(chx[gi * cg:(gi + 1) * cg], rows[gi * og:gi * og + 1].expand(cg))
                if og > 1:
                    tr.g.join(rows[gi * og:gi * og + 1].expand(og - 1), rows[gi * og + 1:(gi + 1) * og])
    ib = tr.of(b)
    if ib is not None and ib.param:
        bl = ib.labels[0].reshape(shape)
        tr.g.join(out_lab, bl)
        tr.g.role(bl, "producer")
    tr.set(out, Info([out_lab]))
    attrs = tuple((k, kwargs.get(k, args[i] if len(args) > i else d))
                  for i, (k, d) in enumerate((("stride", 1), ("padding", 0), ("dilation", 1),
                                              ("groups", 1)), 3))
    tr.g.records.append(OpRecord("conv", name_w, (1, 0), (tuple(x.shape), tuple(w.shape)),
                                 tuple((k, v if not isinstance(v, (list, tuple)) else tuple(v))
                                       for k, v in attrs)))


@rule("avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
      "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
      "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample",
      "max_pool2d_with_indices", "adaptive_max_pool2d_with_indices", "max_pool1d_with_indices")
def _spatial(tr, name, func, args, kwargs, out):
    """Ops over the spatial axes (2 and on) that keep channels apart."""
    x = args[0]
    info = tr.of(x)
    if info is None:
        return
    outs = _outputs(out)
    t = outs[0]
    labs = []
    for lab in info.labels:
        lab = align(lab, x.dim())
        if lab.dim() != t.dim():
            tr.g.block(lab, f"{name} (changes the number of axes)")
            return
        for d in range(2, lab.dim()):
            if lab.shape[d] > 1:
                first = lab.narrow(d, 0, 1)
                tr.g.join(first, lab)
                lab = first
        labs.append(lab)
    tr.set(t, Info(labs, param=info.param))


@rule("scaled_dot_product_attention")
def _sdpa(tr, name, func, args, kwargs, out):
    q, k, v = args[0], args[1], args[2]
    iq, ik, iv = tr.of(q), tr.of(k), tr.of(v)
    if kwargs.get("enable_gqa") and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        ik = Info([align(lab, k.dim()).repeat_interleave(rep, dim=-3) if align(lab, k.dim()).shape[-3] > 1
                   else lab for lab in ik.labels], ik.param) if ik else None
        iv = Info([align(lab, v.dim()).repeat_interleave(rep, dim=-3) if align(lab, v.dim()).shape[-3] > 1
                   else lab for lab in iv.labels], iv.param) if iv else None
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    if iq is not None and q.dim() >= 3:
        head = align(iq.labels[0], q.dim())
        node = int(head.reshape(-1)[0]) if head.numel() else -1
        tr.g.records.append(OpRecord("attention", None, (0, 0),
                                     (tuple(q.shape), tuple(k.shape), tuple(v.shape)), node=node))
    kt = k.transpose(-1, -2)
    ikt = Info([align(lab, k.dim()).transpose(-1, -2) for lab in ik.labels], ik.param) if ik else None
    scores = torch.empty(q.shape[:-1] + (k.shape[-2],))
    _contract(tr, q, iq, kt, ikt, scores)
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    im, iscores = tr.of(mask), tr.info.get(id(scores))
    if im is not None and iscores is not None:  # a mask made of parameters (Swin's relative position bias):
        tr.set(scores, meet(tr, [iscores, im], scores.dim()))  # added to the scores, head by head
    _contract(tr, scores, tr.info.get(id(scores)), v, iv, out)


@rule("multi_head_attention_forward")
def _mha(tr, name, func, args, kwargs, out):
    """``nn.MultiheadAttention``: its fused projection's rows, split by head, and the output projection's
    columns of that head are one unit."""
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")
    a = dict(zip(names, args))
    a.update({k: v for k, v in kwargs.items() if k in names or k.endswith("proj_weight")})
    heads = int(a["num_heads"])
    if not kwargs.get("use_separate_proj_weight", False) and a.get("in_proj_weight") is not None:
        wi, bi = a["in_proj_weight"], a.get("in_proj_bias")
        n = tr.g.nodes.names
        e = wi.shape[0] // 3
        hd = e // heads
        rows = tr.g.nodes.axis(n[id(wi)], 0, wi.shape[0])
        cols = tr.g.nodes.axis(n[id(wi)], 1, wi.shape[1])
        wo = a["out_proj_weight"]
        ocols = tr.g.nodes.axis(n[id(wo)], 1, wo.shape[1])
        orows = tr.g.nodes.axis(n[id(wo)], 0, wo.shape[0])
        per_head = torch.cat([rows.reshape(3, heads, hd).permute(1, 0, 2).reshape(heads, -1),
                              ocols.reshape(heads, hd)], dim=1)
        tr.g.join(per_head[:, :1], per_head)
        tr.g.role(rows, "producer")
        tr.g.role(ocols, "consumer")
        tr.g.role(cols, "consumer")
        tr.g.role(orows, "producer")
        if isinstance(bi, torch.Tensor):
            tr.g.join(rows, tr.g.nodes.axis(n[id(bi)], 0, bi.shape[0]))
        bo = a.get("out_proj_bias")
        if isinstance(bo, torch.Tensor):
            tr.g.join(orows, tr.g.nodes.axis(n[id(bo)], 0, bo.shape[0]))
        for x in (a["query"], a["key"], a["value"]):
            ix = tr.of(x)
            if ix is not None and not ix.param:
                lab = ix.labels[0]
                if lab.shape[-1] > 1:
                    tr.g.join(lab, align(cols, lab.dim()))
                elif int(lab.reshape(-1)[0]) >= 0:
                    tr.g.join(lab.reshape(-1)[:1].expand(cols.numel()), cols)
        res = _outputs(out)
        if res:
            tr.set(res[0], Info([align(orows, res[0].dim())]))
        return
    for x in _tensors((args, kwargs)):
        i = tr.of(x)
        if i is not None:
            for lab in i.labels:
                tr.g.block(lab, "nn.MultiheadAttention with separate q/k/v weights")
