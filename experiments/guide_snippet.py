# The "Test Model Generation" snippet of the researcher's Phase 1 guide, verbatim.
# In Python REPL
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer
from nanochat.engine import Engine
import torch

# Load checkpoint
checkpoint = torch.load('base_checkpoints/d4/checkpoint.pt', map_location='cpu')

# Recreate model
config_kwargs = checkpoint['metadata']['model_config']
config = GPTConfig(**config_kwargs)
model = GPT(config)
model.load_state_dict(checkpoint['model'])
model.eval()

# Generate text
tokenizer = get_tokenizer()
engine = Engine(model, tokenizer)
prompt = "The capital of France is"
tokens = tokenizer(prompt, prepend="<|bos|>")
sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=20, temperature=0)
print(tokenizer.decode(sample[0]))
