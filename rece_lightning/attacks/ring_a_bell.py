"""Ring-A-Bell (Tsai et al., ICLR 2024): a model-agnostic search of discrete prompts towards a concept vector.

1. **Concept vector** from paired prompts in the text encoder's output space::

       v = mean_i ( E(with_concept_i) - E(without_concept_i) )          (T x d, every position)

2. For each attack prompt ``p``, the target ``E(p) + strength * v``.
3. A **genetic search** over prompts of ``num_tokens`` vocabulary tokens for the one whose embedding is closest to the
   target (fitness: mean squared distance over all positions): ``population`` prompts, elitism, tournament
   selection, one-point crossover at ``crossover_rate``, per-token mutation at ``mutation_rate``, ``generations``
   rounds, the text encoder scoring the whole population in batches.

Only the text encoder is used, which erasing K/V leaves unchanged, so one search per prompt serves the original and
the erased model. The evaluator writes the found prompts to ``<output_dir>/adversarial_prompts_ring_a_bell.csv``
(the paper's CSV columns), which any evaluation config can read as its ``prompts_csv``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rece_lightning.attacks.base import AttackContext, AttackOutcome, PromptAttack
from rece_lightning.attacks.unlearndiff import _ordinary_tokens
from rece_lightning.data import PromptItem
from rece_lightning.genetic import check_population, genetic_search
from rece_lightning.validation import check_positive, check_positive_int


class RingABellAttack(PromptAttack):
    """Genetic search of ``num_tokens``-token prompts towards ``E(p) + strength * v``.

    Args:
        concept_prompts: prompts that show the concept (e.g. "a photo of a nude woman"); default ``[concept]``.
        neutral_prompts: the same prompts without it (e.g. "a photo of a woman"), paired by position; default
            ``[""]`` (the empty prompt) for each concept prompt.
        strength: eta, how far past the prompt towards the concept the target lies (paper: 3 for nudity).
        num_tokens: length of the searched prompt in tokens (paper: 16 for nudity).
        population / generations: size of the population and number of rounds (paper: 200 / 3000).
        mutation_rate: chance that a token of a child is replaced by a random one (paper: 0.25).
        crossover_rate: chance that a child mixes two parents (paper: 0.5).
        seed: seeds the search (a rerun finds the same prompt).
        batch_size: prompts per text-encoder call.
    """

    name = "ring_a_bell"
    model_agnostic = True

    def __init__(
        self,
        concept: str,
        concept_prompts: list[str] | None = None,
        neutral_prompts: list[str] | None = None,
        strength: float = 3.0,
        num_tokens: int = 16,
        population: int = 200,
        generations: int = 200,
        mutation_rate: float = 0.25,
        crossover_rate: float = 0.5,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        super().__init__(concept)
        self.concept_prompts = list(concept_prompts) if concept_prompts is not None else [concept]
        neutral = neutral_prompts if neutral_prompts is not None else [""] * len(self.concept_prompts)
        self.neutral_prompts = list(neutral)
        if not self.concept_prompts or len(self.concept_prompts) != len(self.neutral_prompts):
            raise ValueError(
                f"concept_prompts has {len(self.concept_prompts)} prompts but neutral_prompts has "
                f"{len(self.neutral_prompts)}: they pair up one to one"
            )
        self.strength = check_positive("strength", strength)
        self.num_tokens = check_positive_int("num_tokens", num_tokens)
        self.population = check_population(check_positive_int("population", population))
        self.generations = check_positive_int("generations", generations)
        for name, value in (("mutation_rate", mutation_rate), ("crossover_rate", crossover_rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}={value!r} is not allowed: it is a probability in [0, 1]")
        self.mutation_rate, self.crossover_rate = float(mutation_rate), float(crossover_rate)
        self.seed = int(seed)
        self.batch_size = check_positive_int("batch_size", batch_size)

    def check_prompt(self, tokenizer, prompt: str) -> None:
        if self.num_tokens + 2 > tokenizer.model_max_length:
            raise ValueError(
                f"num_tokens={self.num_tokens} does not fit the tokenizer's {tokenizer.model_max_length} positions "
                f"with BOS and EOS: give at most {tokenizer.model_max_length - 2}"
            )

    @torch.no_grad()
    def concept_vector(self, context: AttackContext) -> Tensor:
        """``v``: the mean difference of the paired prompts' embeddings, (T, d)."""
        with_concept = context.encode(self.concept_prompts).float()
        without = context.encode(self.neutral_prompts).float()
        return (with_concept - without).mean(dim=0)

    @torch.no_grad()
    def attack(self, context: AttackContext, items: Sequence[PromptItem], height: int, width: int) -> AttackOutcome:
        family, pipeline = context.family, context.pipeline
        tokenizer, encoder, device = family.tokenizer(pipeline), family.text_encoder(pipeline), context.device
        target = context.encode([items[0].prompt])[0].float() + self.strength * self.concept_vector(context)
        generator = torch.Generator("cpu").manual_seed(self.seed)
        vocabulary = _ordinary_tokens(tokenizer)
        length = tokenizer.model_max_length

        def distance(choices: Tensor) -> Tensor:
            tokens = vocabulary[choices]
            ids = torch.full((len(tokens), length), tokenizer.pad_token_id, dtype=torch.long)
            ids[:, 0] = tokenizer.bos_token_id
            ids[:, 1 : 1 + self.num_tokens] = tokens
            ids[:, 1 + self.num_tokens] = tokenizer.eos_token_id
            out = []
            for start in range(0, len(ids), self.batch_size):
                hidden = encoder(ids[start : start + self.batch_size].to(device))[0].float()
                out.append((hidden - target).pow(2).mean(dim=(1, 2)).cpu())
            return torch.cat(out)

        search = genetic_search(
            distance,
            len(vocabulary),
            self.num_tokens,
            self.population,
            self.generations,
            generator,
            crossover_rate=self.crossover_rate,
            mutation_rate=self.mutation_rate,
        )
        best, losses = vocabulary[search.population[0]], search.losses
        adversarial = tokenizer.decode(best.tolist())
        ids = torch.full((1, length), tokenizer.pad_token_id, dtype=torch.long)
        ids[0, 0], ids[0, 1 : 1 + self.num_tokens], ids[0, 1 + self.num_tokens] = (
            tokenizer.bos_token_id,
            best,
            tokenizer.eos_token_id,
        )
        embeds = encoder(ids.to(device))[0][0]
        return AttackOutcome(embeds, adversarial_prompt=adversarial, steps=self.generations, losses=losses)
