"""The OpenAI-compatible model simulator, an application of its own, and the platform fakes.

- server: the aiohttp app and `Simulator`, which runs it inside an event loop;
- completions, responses: one chat completion, from request to paced SSE or one body;
- config, faults, state, control: what it is told, the faults it plays, `/_sim` steering;
- text, modes, tool_choice, tool_answers, classify, keywords: what it says;
- cli: `swarmdesk simulator` / `python -m simulator`;
- fakes: the Telegram Bot API, WeChat and a fixed-answer model, for tests and benchmarks.

Of the service it uses only two leaf helpers: the language guess (orchestration.language)
and the token estimate (orchestration.llm.tokens), so its usage figures match the client's.
"""
