"""GGUF files for llama.cpp: a Llama-architecture model, and a LoRA adapter for one.

Written with the ``gguf`` package's ``GGUFWriter`` and quantizers, following what llama.cpp's own
converters do for this architecture (convert_hf_to_gguf.py: ``LlamaModel``; convert_lora_to_gguf.py):

* tensor names from ``gguf.get_tensor_name_map(LLAMA)`` (``blk.N.attn_q.weight``...);
* the rows of q_proj and k_proj permuted into llama.cpp's rotary layout (``LlamaModel.permute``;
  transformers' GGUF loader undoes it); for a LoRA only lora_B is permuted (the output rows);
* 1-D tensors and norms in F32, the rest in the file type; for 4-bit types the token embedding in
  Q8_0 (as llama-quantize keeps it); a row that does not split into quant blocks falls back to F16;
* the GPT-2 BPE vocabulary with token types, merges, special ids and the chat template
  (``gguf.SpecialVocab``), and ``tokenizer.ggml.pre`` from the hash of a reference text's tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import InvalidInput

# convert_hf_to_gguf.py's get_vocab_base_pre: the text whose token ids identify a BPE pre-tokenizer,
# and the identities of the Llama-architecture tokenizers we know.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 "
    "3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e "
    "\u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM(2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def _qtype(name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
            "q5_0": gguf.GGMLQuantizationType.Q5_0, "q5_1": gguf.GGMLQuantizationType.Q5_1}[name]


def _file_type(name: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
            "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1}[name]


def permute(weights, n_head: int, n_head_kv: int | None):
    """llama.cpp's ``LlamaModel.permute``: q/k rows from HF's rotary halves to interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _check_llama(config: dict) -> None:
    architectures = config.get("architectures") or []
    if config.get("model_type") not in ("llama", "mistral") or not set(architectures) & set(LLAMA_ARCHITECTURES):
        raise InvalidInput(f"GGUF export writes Llama-architecture models; this base is {architectures or '?'} "
                           f"({config.get('model_type')}). Export format='hf' and convert it with llama.cpp's "
                           "convert_hf_to_gguf.py.")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or rope.get("type")
    if rope_type not in (None, "default", "linear"):
        raise InvalidInput(f"GGUF export does not write rope scaling {rope_type!r}; export format='hf' and convert "
                           "it with llama.cpp's convert_hf_to_gguf.py.")


def _heads(config: dict) -> tuple[int, int]:
    n_head = config["num_attention_heads"]
    return n_head, config.get("num_key_value_heads") or n_head


def _add_hparams(writer, config: dict, file_type: str, name: str) -> None:
    import gguf

    n_head, n_kv = _heads(config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rope = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    rope_scaling = config.get("rope_scaling") or {}
    if (rope_scaling.get("rope_type") or rope_scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(_file_type(file_type))
    writer.add_vocab_size(config["vocab_size"])
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_vocab(writer, folder: Path, vocab_size: int) -> list[str]:
    """The BPE vocabulary as convert_hf_to_gguf.py's ``_set_vocab_gpt2`` writes it; notes on what it guessed."""
    import gguf
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file():
        raise InvalidInput("GGUF export needs a BPE tokenizer saved as tokenizer.json (GPT-2 style, as SmolLM2 and "
                           "Llama 3 have); export format='hf' and convert with llama.cpp's convert_hf_to_gguf.py.")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise InvalidInput(f"The tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} rows.")
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    notes = []
    pre = PRE_TOKENIZERS.get(chkhsh)
    if pre is None:
        pre = "default"
        notes.append(f"Unknown BPE pre-tokenizer (hash {chkhsh[:16]}...): wrote tokenizer.ggml.pre='default'; "
                     "llama.cpp may split some text differently than transformers.")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if decoder[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True)
    special.add_to_gguf(writer, quiet=True)
    if vocab_size == 49152:  # convert_hf_to_gguf.py: the SmolLM/granite small vocabularies add no BOS
        writer.add_add_bos_token(False)
    return notes


def _tensor_data(name: str, data, qtype_name: str, n_dims: int):
    """(bytes-or-array, GGML type) for one tensor, following convert_hf_to_gguf.py's choices."""
    import gguf
    import numpy as np

    if n_dims <= 1 or name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32
    elif name == "token_embd.weight" and qtype_name in ("q4_0", "q4_1", "q5_0", "q5_1"):
        qtype = gguf.GGMLQuantizationType.Q8_0
    else:
        qtype = _qtype(qtype_name)
    data = np.ascontiguousarray(data, dtype=np.float32)
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def hf_dir_to_gguf(folder: Path, path: Path, qtype_name: str, *, name: str) -> list[str]:
    """Write the Llama model saved in ``folder`` (safetensors) as one GGUF file at ``path``."""
    import gguf
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    _check_llama(config)
    n_head, n_kv = _heads(config)
    blocks = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, config, qtype_name, name)
    notes = _add_vocab(writer, folder, config["vocab_size"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidInput(f"{folder} holds no safetensors weights.")
    tied = bool(config.get("tie_word_embeddings"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no iterator)
                if key.endswith(("rotary_emb.inv_freq", ".attention.masked_bias")):
                    continue
                if key == "lm_head.weight" and tied:
                    continue  # llama.cpp reads token_embd as the output layer when output.weight is absent
                tensor = f.get_tensor(key).float()
                if key.endswith("q_proj.weight"):
                    tensor = permute(tensor, n_head, n_head)
                elif key.endswith("k_proj.weight"):
                    tensor = permute(tensor, n_head, n_kv)
                new_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new_name is None:
                    raise InvalidInput(f"GGUF export does not know where the tensor {key!r} goes in llama.cpp's "
                                       "Llama layout.")
                data, qtype = _tensor_data(new_name, tensor.numpy(), qtype_name, tensor.dim())
                writer.add_tensor(new_name, data, raw_dtype=qtype)
    _write(writer)
    return notes


def _write(writer) -> None:
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def lora_to_gguf(adapter_dir: Path, adapter_config: dict, base_config, path: Path, qtype_name: str, *,
                 name: str) -> list[str]:
    """Write the adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF (``general.type = adapter``)."""
    import gguf

    from ..adapter_files import read_weights

    config = base_config.to_dict() if hasattr(base_config, "to_dict") else dict(base_config)
    _check_llama(config)
    if adapter_config.get("use_dora"):
        raise InvalidInput("A DoRA adapter has a magnitude vector llama.cpp's LoRA format cannot hold; export "
                           "format='gguf' (merged) instead.")
    if adapter_config.get("modules_to_save"):
        raise InvalidInput("This adapter also saves whole modules (modules_to_save), which llama.cpp's LoRA format "
                           "cannot hold; export format='gguf' (merged) instead.")
    rank = int(adapter_config["r"])
    alpha = float(adapter_config.get("lora_alpha", rank))
    notes = []
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise InvalidInput("This adapter uses per-layer ranks or alphas (rank_pattern/alpha_pattern), which "
                           "llama.cpp's LoRA format (one alpha) cannot hold; export format='gguf' (merged) instead.")
    if adapter_config.get("use_rslora"):
        # peft scales rsLoRA by alpha / sqrt(r); llama.cpp by alpha / r: write the alpha that gives the same scale.
        notes.append(f"rsLoRA: wrote adapter.lora.alpha = {alpha} * sqrt({rank}) so llama.cpp's alpha / r scale "
                     "equals peft's alpha / sqrt(r).")
        alpha = alpha * rank ** 0.5
    n_head, n_kv = _heads(config)
    blocks = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    pairs: dict[str, dict] = {}
    for key, tensor in read_weights(adapter_dir).items():
        for part, side in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
            if part in key:
                base_name = key.split("base_model.model.", 1)[-1].replace(part, ".weight")
                pairs.setdefault(base_name, {})[side] = tensor.float()
                break
        else:
            raise InvalidInput(f"The adapter holds {key!r}, which is not a lora_A / lora_B weight; llama.cpp's LoRA "
                               "format cannot hold it. Export format='gguf' (merged) instead.")
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(_file_type(qtype_name))
    for base_name in sorted(pairs, key=_layer_order):
        pair = pairs[base_name]
        if set(pair) != {"a", "b"}:
            raise InvalidInput(f"The adapter has only one of lora_A / lora_B for {base_name}; it is incomplete.")
        new_name = names.get_name(base_name, try_suffixes=(".weight",))
        if new_name is None or base_name.endswith(("embed_tokens.weight", "lm_head.weight")):
            raise InvalidInput(f"The adapter trains {base_name!r}, which llama.cpp's LoRA format cannot hold here; "
                               "export format='gguf' (merged) instead.")
        lora_a, lora_b = pair["a"], pair["b"]
        if base_name.endswith("q_proj.weight"):
            lora_b = permute(lora_b, n_head, n_head)
        elif base_name.endswith("k_proj.weight"):
            lora_b = permute(lora_b, n_head, n_kv)
        for suffix, tensor in ((".lora_a", lora_a), (".lora_b", lora_b)):
            data, qtype = _tensor_data(new_name + suffix, tensor.numpy(), qtype_name, 2)
            writer.add_tensor(new_name + suffix, data, raw_dtype=qtype)
    _write(writer)
    return notes


def _layer_order(name: str) -> tuple:
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), -1)
    return layer, name
