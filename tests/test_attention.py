"""Attention over packed documents (model/attention.py): the per-document kernel equals the dense-mask one in outputs
and gradients, one document per row builds no mask, flash-attn's varlen call gets what it documents (faked here:
flash-attn needs CUDA), an all-padding batch attends to nothing, and a packed forward leaves the host in step with
the device: no reads of device values, except the one per MoE layer that routing needs."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model.attention as attention
from model import ModelConfig, Transformer
from model.attention import DocumentMask, Documents, attend
from tests.test_model import make_model, pack, random_ids

# Rows as the loaders and generation make them: packed documents, right padding, left padding (generation's
# prompts), one whole row, and a padding row (evaluation completes its last batch with them).
ROWS = [[5, 7, 4], [9, 3], [16], []]
LEFT_PADDED = torch.tensor([[-1] * 6 + [0] * 10])


def doc_ids_of_rows() -> torch.Tensor:
    return torch.cat([pack(ROWS, 16)[0], LEFT_PADDED])


def qkv(doc_ids, heads=4, kv_heads=2, head_dim=8):
    generator = torch.Generator().manual_seed(0)
    rows, seq_len = doc_ids.shape
    return [torch.randn(rows, seq_len, n, head_dim, generator=generator, requires_grad=True)
            for n in (heads, kv_heads, kv_heads)]


def test_documents_cut_the_flattened_batch():
    documents = Documents(doc_ids_of_rows())
    assert documents.lengths.tolist() == [5, 7, 4, 9, 3, 16, 10]
    assert documents.starts.tolist() == [0, 5, 12, 16, 25, 32, 70]
    assert documents.pieces == [5, 7, 4, 9, 3, -4, 16, -22, 10]  # padding runs negative, merged across rows
    assert not documents.one_per_row and Documents(torch.zeros(2, 5, dtype=torch.long)).one_per_row
    assert Documents(torch.full((2, 3), -1)).pieces == [-6]


@pytest.mark.parametrize("heads", [4, 2], ids=["gqa", "mha"])
def test_per_document_kernel_equals_dense_mask_in_outputs_and_gradients(heads):
    doc_ids = doc_ids_of_rows()
    real = doc_ids >= 0
    grad = torch.randn(*doc_ids.shape, heads, 8, generator=torch.Generator().manual_seed(1)) * real[..., None, None]
    results = []
    for mask in (DocumentMask(doc_ids, documents=Documents(doc_ids)), DocumentMask(doc_ids)):
        q, k, v = qkv(doc_ids, heads=heads)
        kernel = attention._by_document if mask._documents else attention._dense_sdpa  # the path before
        out = kernel(q, k, v, mask, 0.0)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    (out, *grads), (dense, *dense_grads) = results
    assert torch.isfinite(out).all() and (out[~real] == 0).all()
    torch.testing.assert_close(out[real], dense[real], atol=1e-6, rtol=0)
    for grad_, dense_grad in zip(grads, dense_grads):
        torch.testing.assert_close(grad_, dense_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("heads", [4, 2], ids=["gqa", "mha"])
def test_queries_against_a_cache_equal_the_math_kernel_in_outputs_and_gradients(heads):
    """Decoding's path (fewer queries than keys): query heads stacked per KV head against a left-padded cache."""
    k_doc_ids = torch.tensor([[-1] * 4 + [0] * 8, [0] * 12])
    mask = DocumentMask(k_doc_ids[:, -3:], k_doc_ids)
    q = qkv(k_doc_ids[:, -3:], heads=heads)[0]
    k, v = qkv(k_doc_ids, heads=heads)[1:]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for kernel in (attention._grouped_sdpa, attention._math):
        out = kernel(q, k, v, mask, 0.0)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for grouped, math in zip(*results):
        torch.testing.assert_close(grouped, math, atol=1e-6, rtol=0)


def test_transformer_with_host_documents_equals_dense_math_kernel_in_logits_and_gradients():
    model = make_model("tiny", attn_impl="sdpa").train()
    dense = Transformer(dataclasses.replace(model.config, attn_impl="math")).train()
    dense.load_state_dict(model.state_dict())
    doc_ids = doc_ids_of_rows()
    input_ids = random_ids(model.config, *doc_ids.shape)
    real = doc_ids >= 0
    logits = model(input_ids, doc_ids, documents=Documents(doc_ids)).logits
    dense_logits = dense(input_ids, doc_ids).logits
    torch.testing.assert_close(logits[real], dense_logits[real], atol=1e-5, rtol=0)
    logits[real].square().sum().backward()
    dense_logits[real].square().sum().backward()
    for (name, parameter), dense_parameter in zip(model.named_parameters(), dense.parameters()):
        scale = dense_parameter.grad.abs().max()  # float32 rounding relative to the largest gradient
        torch.testing.assert_close(parameter.grad, dense_parameter.grad, atol=1e-5 * scale, rtol=0, msg=name)


def test_one_document_per_row_builds_no_mask(monkeypatch):
    model = make_model("tiny", attn_impl="sdpa")
    doc_ids = torch.zeros(2, 16, dtype=torch.long)
    expected = model(random_ids(model.config, 2, 16)).logits
    calls = []

    def sdpa(q, k, v, original=F.scaled_dot_product_attention, **options):
        calls.append(options)
        return original(q, k, v, **options)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(DocumentMask, "dense", property(lambda mask: pytest.fail("built a dense mask")))
    logits = model(random_ids(model.config, 2, 16), doc_ids, documents=Documents(doc_ids)).logits
    assert calls == [dict(dropout_p=0.0, is_causal=True, enable_gqa=True)] * model.config.num_layers
    torch.testing.assert_close(logits, expected)


def fake_varlen(calls):
    """flash_attn_varlen_func as flash-attn 2.8 documents it, computed with SDPA per document."""
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               causal=False):
        calls.append(dict(q=q, k=k, cu_seqlens=cu_seqlens_q, max_seqlen=max_seqlen_q, causal=causal))
        assert cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        bounds = cu_seqlens_q.tolist()
        return torch.cat([attention._transposed(F.scaled_dot_product_attention, *(t[None, a:b] for t in (q, k, v)),
                                                is_causal=causal, enable_gqa=True)[0]
                          for a, b in zip(bounds, bounds[1:])])
    return flash_attn_varlen_func


def test_flash_varlen_gets_int32_cu_seqlens_an_int_max_and_token_major_layout(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "flash_attn_varlen_func", fake_varlen(calls))
    monkeypatch.setattr(attention, "resolve_impl", lambda requested, q, k: "flash")  # this CPU runs the fake
    doc_ids = doc_ids_of_rows()
    q, k, v = qkv(doc_ids)
    out = attend(q, k, v, DocumentMask(doc_ids, documents=Documents(doc_ids)))
    (call,) = calls
    lengths = [5, 7, 4, 9, 3, 16, 10]
    assert call["cu_seqlens"].dtype == torch.int32
    assert call["cu_seqlens"].tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert type(call["max_seqlen"]) is int and call["max_seqlen"] == 16
    assert call["q"].shape == (sum(lengths), 4, 8) and call["k"].shape == (sum(lengths), 2, 8) and call["causal"]
    real = doc_ids >= 0
    dense = attention._dense_sdpa(q, k, v, DocumentMask(doc_ids), 0.0)
    torch.testing.assert_close(out[real], dense[real], atol=1e-6, rtol=0)
    assert (out[~real] == 0).all()


def test_all_padding_batch_attends_to_nothing_under_flash(monkeypatch):
    """Evaluation's last batch on a rank may be all padding rows: no documents, so no call at all."""
    calls = []
    monkeypatch.setattr(attention, "flash_attn_varlen_func", fake_varlen(calls))
    monkeypatch.setattr(attention, "resolve_impl", lambda requested, q, k: "flash")
    doc_ids = torch.full((2, 8), -1)
    q, k, v = qkv(doc_ids)
    for documents in (Documents(doc_ids), None):  # from the host, or read back from doc_ids
        out = attend(q, k, v, DocumentMask(doc_ids, documents=documents))
        assert out.shape == q.shape and (out == 0).all()
    assert calls == []


class HostReads(TorchDispatchMode):
    """Records the ops that, on a GPU, make the host wait for the device: a value read back (item, int(), bool()),
    or an output whose size depends on values (nonzero, boolean indexing, unique, bincount)."""
    WAITING = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2", "unique_dim",
               "bincount", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.WAITING:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def recording_reads(monkeypatch) -> HostReads:
    reads = HostReads()
    for name in ("tolist", "numpy"):  # they read a tensor without dispatching an op
        def method(tensor, *args, name=name, original=getattr(torch.Tensor, name)):
            reads.ops.append(name)
            return original(tensor, *args)
        monkeypatch.setattr(torch.Tensor, name, method)
    return reads


@pytest.mark.parametrize("preset, reads_per_layer", [("tiny", 0), ("tiny-moe", 1)])
def test_packed_forward_and_backward_read_nothing_back_but_moe_routing(monkeypatch, preset, reads_per_layer):
    model = make_model(preset).train()
    doc_ids = doc_ids_of_rows()
    input_ids = random_ids(model.config, *doc_ids.shape)
    documents = Documents(doc_ids)  # on the host, before the batch would go to the device
    reads = recording_reads(monkeypatch)
    with reads:
        output = model(input_ids, doc_ids, documents=documents)
        (output.logits.square().mean() + (0 if output.aux_loss is None else output.aux_loss)).backward()
    # MoE: each expert's token count, which eager kernels need on the host (model/moe.py).
    assert reads.ops == ["tolist"] * (reads_per_layer * model.config.num_layers)


def test_moe_layer_reads_one_count_and_equals_a_loop_over_experts(monkeypatch):
    torch.manual_seed(0)
    moe = Transformer(ModelConfig.from_preset("tiny-moe")).layers[0].ffn
    x = torch.randn(2, 16, moe.router.in_features)
    reads = recording_reads(monkeypatch)
    with reads:
        out, balance = moe(x)
    assert reads.ops == ["tolist"]
    monkeypatch.undo()
    tokens = x.flatten(0, 1)  # the loop over experts the dispatch replaced, one host read per expert
    probs = moe.router(tokens).float().softmax(dim=-1)
    weights, chosen = probs.topk(moe.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    expected = sum(expert(tokens) for expert in moe.shared_experts)
    for index, expert in enumerate(moe.experts):
        token, slot = torch.where(chosen == index)
        expected = expected.index_add(0, token, expert(tokens[token]) * weights[token, slot, None])
    load = torch.bincount(chosen.flatten(), minlength=len(moe.experts)) / chosen.numel()
    torch.testing.assert_close(out.flatten(0, 1), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(balance, len(moe.experts) * (load * probs.mean(dim=0)).sum())


def test_compiled_blocks_attend_by_document_as_one_op_in_one_graph(monkeypatch):
    """--compile (train/compile.py) lays the documents out eagerly and the compiled block calls the per-document
    kernel as one op: a batch with other documents reuses the graph, and outputs and gradients equal eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from train import compile as compiling

    graphs = []

    def aot_eager(graph, inputs):  # inductor's code generation is slow here; the graph is the same
        graphs.append(str(graph.graph))
        keep = lambda graph, _: make_boxed_func(graph.forward)  # noqa: E731
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(graph, inputs)
    monkeypatch.setattr(compiling.torch, "compile",
                        lambda fn, original=torch.compile, **options: original(fn, backend=aot_eager))
    torch._dynamo.reset()
    eager = make_model("tiny").train()
    compiled = make_model("tiny").train()
    compiling.compile_blocks(compiled)
    doc_ids = doc_ids_of_rows()
    for layout in (doc_ids, doc_ids.roll(1, dims=0)):
        input_ids = random_ids(eager.config, *layout.shape)
        real = layout >= 0
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            logits = model(input_ids, layout, documents=Documents(layout)).logits
            logits[real].square().mean().backward()
            results.append((logits[real], model.layers[0].attn.q_proj.weight.grad))
        (logits, grad), (compiled_logits, compiled_grad) = results
        torch.testing.assert_close(compiled_logits, logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled_grad, grad, atol=1e-6, rtol=1e-4)
    assert len(graphs) == 1 and "zerostage.attend_by_document" in graphs[0]
