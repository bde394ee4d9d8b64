"""The embedded sentiment task's prompt set, generated in code so it ships without data files.

The task (after the DPO paper's controlled-sentiment experiment) asks the policy to continue or
write a short movie review that the gold sentiment judge scores as positive.  The prompts are
our own: invented titles crossed with openings that are deliberately neutral — no "great",
"awful", "loved" — so any sentiment in a completion comes from the policy, not the prompt, and
the base model starts from a roughly balanced reward distribution.
"""

from __future__ import annotations

from prefopt.data.records import PromptRecord

SENTIMENT_TEMPLATES: tuple[str, ...] = (
    "I watched {title} last night and",
    "My review of {title}: the acting was",
    "Here is my short review of the film {title}:",
    "After two hours of {title}, I",
    "{title} is a film that",
    "Write a short review of the movie {title}.",
    "I just got back from seeing {title}, and",
    "The first thing you notice about {title} is",
    "Review: {title}. The story",
    "My friends and I saw {title} this weekend. Overall, it",
    "In a few sentences, tell me what you thought of the movie {title}.",
    "Having finally seen {title}, I would say the film",
)
"""Openings that begin, or ask for, a review without committing to a sentiment."""

MOVIE_TITLES: tuple[str, ...] = (
    "The Glass Orchard",
    "Harbor of Small Lights",
    "Midnight at Fennwick Station",
    "The Cartographer's Son",
    "Seven Winters in Alder Bay",
    "A House Called Marrow",
    "The Last Tram to Velsk",
    "Paper Kites Over Dunmore",
    "The Quiet Engine",
    "Saltwater Letters",
    "Beneath the Copper Hill",
    "The Widow of Larch Street",
    "Northbound With Oscar Pell",
    "The Lanternmaker",
    "Echoes of the Brass Valley",
    "Tuesday's Astronaut",
    "The Orchid Ledger",
    "A Map for Ferris",
    "The Drowned Bell of Kirren",
    "Half a Mile of Fog",
    "The Understudy's Daughter",
    "Marigold Circuit",
    "The Clockmaker of Pell Harbor",
    "Signals from Lake Odra",
    "Ashgrove Nights",
    "The Ninth Passenger",
    "Rivers Under Grenmoor",
    "The Beekeeper's Wager",
    "Copperline",
    "A Summer Without Telephones",
    "The Salt Road to Ilvana",
    "Winter Guests at the Hotel Brisk",
    "The Violinist of Stone Quay",
    "Dust on the Meridian",
    "The Gardener and the Comet",
    "Borrowed Thunder",
    "The Archivist of Lower Wick",
    "Starlings Over Calder Yard",
    "The Seventh Floor of the Rosmund",
    "Night Ferry to Tallow Point",
)
"""Invented titles, so the base model has no prior reviews of them memorised."""


def sentiment_prompts() -> list[PromptRecord]:
    """Return the sentiment task's prompts: every template x every title (480 prompts).

    The order is fixed (title-major, then template) so seeded splits are reproducible across
    runs and machines; ``meta`` records the template index and title for per-slice analysis.
    """
    return [
        PromptRecord(
            prompt=template.format(title=title),
            meta={"task": "sentiment", "template": i, "title": title},
        )
        for title in MOVIE_TITLES
        for i, template in enumerate(SENTIMENT_TEMPLATES)
    ]
