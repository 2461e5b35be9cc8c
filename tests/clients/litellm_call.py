"""One LiteLLM call against llm_module's OpenAI-compatible API (run in the client venv).

    python litellm_call.py BASE_URL API_KEY MODEL
"""

import json
import sys

import litellm

base_url, api_key, model = sys.argv[1:4]
response = litellm.completion(model=f"openai/{model}", api_base=base_url, api_key=api_key, max_tokens=8,
                              temperature=0, messages=[{"role": "user", "content": "Say hello."}])
print(json.dumps({"text": response.choices[0].message.content, "model": response.model,
                  "finish": response.choices[0].finish_reason}))
