"""Sample text from a Tinytron checkpoint or an exported Hugging Face folder.

    tinytron-generate --checkpoint logs/run_abcd1234 --prompt "ROMEO:" \\
        [--tokenizer <folder or hub name>] [--max_new_tokens 100] [--temperature 0.8] [--top_k 50]
        [--top_p 0.95] [--seed 0] [--device auto]
    python -m tinytron.commands.generate ...   (the same)

The weights go into the equivalent `transformers` model (Llama / Mixtral, see tinytron.interop.hf)
and its `generate` does the decoding, with a KV cache. --temperature 0 decodes greedily. Prints the
prompt followed by the continuation.
"""


import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from tinytron.data.tokenize import load_tokenizer
from tinytron.distributed.runtime import pick_device
from tinytron.interop.hf import is_hf_dir, to_hf_model
from tinytron.model import GPT
from tinytron.training.arguments import FlagParser
from tinytron.training.weights import read_checkpoint, run_tokenizer


def load_generator(source: str | GPT, tokenizer=None, device: str = "auto",
                   dtype: torch.dtype | None = None):
    """-> (transformers model in eval mode on `device`, tokenizer).

    source: a GPT in memory (then `tokenizer` is required), a Tinytron checkpoint (step folder, run
    folder or model.pt; the tokenizer defaults to the run's --tokenizer) or a Hugging Face folder
    (the tokenizer defaults to the one saved in it). tokenizer: a tokenizer or a name/path.
    dtype: default bf16 on a GPU that supports it, else fp32.
    """
    device = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    hf_dir = isinstance(source, str) and is_hf_dir(source)
    meta = None
    if isinstance(source, str) and not hf_dir:
        state, config, meta = read_checkpoint(source)
    if tokenizer is None:
        tokenizer = source if hf_dir else run_tokenizer(meta) if meta else None
    if tokenizer is None:
        raise ValueError("no tokenizer: pass --tokenizer (the checkpoint's run has none recorded)")
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(source, GPT):
        model = to_hf_model(source, source.config, dtype, tokenizer)
    elif hf_dir:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    else:
        model = to_hf_model(state, config, dtype, tokenizer)
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def generate_text(model: PreTrainedModel, tokenizer, prompt: str, max_new_tokens: int = 100,
                  temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95, seed: int = 0) -> str:
    """The continuation of `prompt` (without the prompt), sampled with temperature / top-k / top-p,
    or greedy when temperature is 0. Seeded; the caller's RNG state is left untouched."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] == 0:  # an empty prompt starts from the document separator
        ids = torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id]], device=model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    pad = model.generation_config.pad_token_id
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.eos_token_id if pad is None else pad, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Tinytron step/run folder or model.pt, or a HF folder")
    parser.add_argument("--prompt", default="", help="text to continue (default: none, sample from the start)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub name (default: the run's)")
    parser.add_argument("--max_new_tokens", type=int, default=100, help="tokens to sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=0.95, help="nucleus: the likeliest tokens of this mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    try:
        model, tokenizer = load_generator(args.checkpoint, args.tokenizer, args.device)
    except ValueError as e:   # bad input: one line, exit 2
        parser.error(str(e))
    print(args.prompt + generate_text(model, tokenizer, args.prompt, args.max_new_tokens,
                                      args.temperature, args.top_k, args.top_p, args.seed))


if __name__ == "__main__":
    main()
