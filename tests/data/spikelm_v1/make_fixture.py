"""Made with the code of commit eac9d20 (config without config_version): python make_fixture.py OUT"""
import sys, json, torch
from safetensors.torch import save_file
from spikelm import SpikeLMConfig, SpikeLMForCausalLM
torch.manual_seed(0)
cfg = SpikeLMConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, block_types=["ssm", "attention"],
                    num_attention_heads=2, attention_window=8, eos_token_id=0, pad_token_id=1)
m = SpikeLMForCausalLM(cfg).eval()
out = sys.argv[1]
m.save_pretrained(out)
ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = m(input_ids=ids, use_cache=False).logits
    gen = m.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=1)
save_file({"input_ids": ids, "logits": logits.contiguous(), "generated": gen}, f"{out}/expected.safetensors")
print(json.load(open(f"{out}/config.json")).keys(), logits.shape, gen)
