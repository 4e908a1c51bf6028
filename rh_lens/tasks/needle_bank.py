"""A bank of 40 needles for held-out evaluation: rank heads on one half, test them on the other.

Every subject is invented (no model can know who keeps the keys of a lighthouse that does not
exist), so an answer can only come from reading the haystack. Answers vary in kind (names,
numbers, places, phrases, dates, codes) and length (2-12 words, 3-15 tokens), and no two needles
share a subject, so a head that copies one needle's answer is never rewarded on another's.
The halves "bank-a" and "bank-b" interleave the kinds, so each holds every kind.
"""

from __future__ import annotations

from rh_lens.tasks.needles import Needle


def _needle(needle: str, question: str, answer: str, kind: str) -> tuple[Needle, str]:
    return Needle(needle=needle, question=question, real_needle=answer), kind


_BANK = (
    _needle(
        "The harbour master of Quellstone Port is a retired sailor named Ottoline Brackwater.",
        "Who is the harbour master of Quellstone Port?",
        "Ottoline Brackwater",
        "name",
    ),
    _needle(
        "The Marrowfield orchard harvested exactly 4,816 crates of pears last autumn.",
        "How big was the pear harvest of the Marrowfield orchard last autumn?",
        "4,816 crates",
        "number",
    ),
    _needle(
        "The lost bell of the Saint Orlen chapel was finally found beneath the mill pond at Wrenhollow.",
        "Where was the lost bell of the Saint Orlen chapel found?",
        "beneath the mill pond at Wrenhollow",
        "place",
    ),
    _needle(
        "The motto carved above the door of the Tessaly guild hall reads patience outlasts every storm.",
        "What motto is carved above the door of the Tessaly guild hall?",
        "patience outlasts every storm",
        "phrase",
    ),
    _needle(
        "The first train reached the village of Dunmere Cross on 14 March 1887.",
        "When did the first train reach the village of Dunmere Cross?",
        "14 March 1887",
        "date",
    ),
    _needle(
        "The combination to the vault under the Corvane Exchange is 7-31-19-4.",
        "What is the combination to the vault under the Corvane Exchange?",
        "7-31-19-4",
        "code",
    ),
    _needle(
        "The cartographer who mapped the Ysolde Marshes was a young woman called Perpetua Lindqvist.",
        "Who mapped the Ysolde Marshes?",
        "Perpetua Lindqvist",
        "name",
    ),
    _needle(
        "The bridge over the Caddow gorge is held up by 212 iron rivets.",
        "What holds up the bridge over the Caddow gorge?",
        "212 iron rivets",
        "number",
    ),
    _needle(
        "The founders of the Amberlyn choir first rehearsed in a barn behind the Greyfold tannery.",
        "Where did the founders of the Amberlyn choir first rehearse?",
        "in a barn behind the Greyfold tannery",
        "place",
    ),
    _needle(
        "When asked about her success, the potter Ilsabet Crane always said clay remembers every careless thumb.",
        "What did the potter Ilsabet Crane always say when asked about her success?",
        "clay remembers every careless thumb",
        "phrase",
    ),
    _needle(
        "The Kestrow observatory recorded its brightest comet on the night of 2 October 1911.",
        "On what night did the Kestrow observatory record its brightest comet?",
        "2 October 1911",
        "date",
    ),
    _needle(
        "The radio call sign of the research vessel Morwen Tide is ZX-4417-Q.",
        "What is the radio call sign of the research vessel Morwen Tide?",
        "ZX-4417-Q",
        "code",
    ),
    _needle(
        "The baker who won the Halden Fair pie contest eleven years running was Barnaby Oakhurst.",
        "Who won the Halden Fair pie contest eleven years running?",
        "Barnaby Oakhurst",
        "name",
    ),
    _needle(
        "The Pellinore library lends out 3,950 books in an ordinary month.",
        "How much does the Pellinore library lend out in an ordinary month?",
        "3,950 books",
        "number",
    ),
    _needle(
        "The smugglers of Tarrow Reach kept their brandy in a cave below the northern cliffs of Skelda.",
        "Where did the smugglers of Tarrow Reach keep their brandy?",
        "in a cave below the northern cliffs of Skelda",
        "place",
    ),
    _needle(
        "The only rule of the Vantrell chess club is that nobody may resign before the fortieth move.",
        "What is the only rule of the Vantrell chess club?",
        "nobody may resign before the fortieth move",
        "phrase",
    ),
    _needle(
        "The Glimmerdale canal was opened to barges on 30 June 1794.",
        "When was the Glimmerdale canal opened to barges?",
        "30 June 1794",
        "date",
    ),
    _needle(
        "Members of the Orrin Street reading circle enter with the password blue heron at midnight.",
        "What password do members of the Orrin Street reading circle enter with?",
        "blue heron at midnight",
        "code",
    ),
    _needle(
        "The stonemason who rebuilt the Calloway tower after the fire was Hezekiah Fairweather.",
        "Who rebuilt the Calloway tower after the fire?",
        "Hezekiah Fairweather",
        "name",
    ),
    _needle(
        "The Brindlemoor farm shears 1,374 sheep each spring.",
        "How big is the spring shearing at the Brindlemoor farm?",
        "1,374 sheep",
        "number",
    ),
    _needle(
        "The painter Rosalind Achterberg kept her finished canvases in the attic of a boathouse at Eskerby.",
        "Where did the painter Rosalind Achterberg keep her finished canvases?",
        "in the attic of a boathouse at Eskerby",
        "place",
    ),
    _needle(
        "The inscription on the Thornbury sundial says every shadow is borrowed from the sun.",
        "What does the inscription on the Thornbury sundial say?",
        "every shadow is borrowed from the sun",
        "phrase",
    ),
    _needle(
        "The great flood of the river Anselm crested on 9 November 1952.",
        "When did the great flood of the river Anselm crest?",
        "9 November 1952",
        "date",
    ),
    _needle(
        "The catalogue number of the missing Vorhaus manuscript is MS-88-KT-203.",
        "What is the catalogue number of the missing Vorhaus manuscript?",
        "MS-88-KT-203",
        "code",
    ),
    _needle(
        "The ferry between Lisk and Ombray is captained by a quiet woman named Galatea Morrow.",
        "Who captains the ferry between Lisk and Ombray?",
        "Galatea Morrow",
        "name",
    ),
    _needle(
        "The clock tower of Ferrowgate has 96 steps from the street to the bells.",
        "How tall is the clock tower of Ferrowgate, counted from the street to the bells?",
        "96 steps",
        "number",
    ),
    _needle(
        "The annual kite festival of the Sablewick valley is held on the flat hill above Penmarrow.",
        "Where is the annual kite festival of the Sablewick valley held?",
        "on the flat hill above Penmarrow",
        "place",
    ),
    _needle(
        "The Dravenmoor school teaches its pupils to fold paper cranes before they learn to write.",
        "What does the Dravenmoor school teach its pupils before they learn to write?",
        "to fold paper cranes",
        "phrase",
    ),
    _needle(
        "The treaty of Corriveth was signed by both duchies on 21 April 1683.",
        "When was the treaty of Corriveth signed?",
        "21 April 1683",
        "date",
    ),
    _needle(
        "The serial number stamped on the Hollin engine block is HX 5502 R.",
        "What serial number is stamped on the Hollin engine block?",
        "HX 5502 R",
        "code",
    ),
    _needle(
        "The beekeeper who tends the hives of Ashcombe Abbey is an old monk named Brother Ambrose Tilling.",
        "Who tends the hives of Ashcombe Abbey?",
        "Brother Ambrose Tilling",
        "name",
    ),
    _needle(
        "The Wexford Lane market has 58 stalls on a busy Saturday.",
        "How big is the Wexford Lane market on a busy Saturday?",
        "58 stalls",
        "number",
    ),
    _needle(
        "The wreck of the schooner Larkspur lies on a sandbar off the point of Cael Morna.",
        "Where does the wreck of the schooner Larkspur lie?",
        "on a sandbar off the point of Cael Morna",
        "place",
    ),
    _needle(
        "The weavers of Istermoor end every bolt of cloth with a single thread of undyed silver wool.",
        "How do the weavers of Istermoor end every bolt of cloth?",
        "with a single thread of undyed silver wool",
        "phrase",
    ),
    _needle(
        "The Ravensholm museum opened its doors to the public on 5 August 1926.",
        "When did the Ravensholm museum open its doors to the public?",
        "5 August 1926",
        "date",
    ),
    _needle(
        "The lock on the gate of the Merriden botanical garden opens with the code 8812-Delta.",
        "What code opens the lock on the gate of the Merriden botanical garden?",
        "8812-Delta",
        "code",
    ),
    _needle(
        "The fiddler who plays every wedding in Cobbleford is a tall man called Lucan Thistlewood.",
        "Who plays every wedding in Cobbleford?",
        "Lucan Thistlewood",
        "name",
    ),
    _needle(
        "The Hawthorn Ridge vineyard bottled 27,300 bottles of red wine in its best year.",
        "How much red wine did the Hawthorn Ridge vineyard produce in its best year?",
        "27,300 bottles",
        "number",
    ),
    _needle(
        "The fire watchers of Oldmere kept their lookout at the top of the disused grain silo by the railway.",
        "Where did the fire watchers of Oldmere keep their lookout?",
        "at the top of the disused grain silo by the railway",
        "place",
    ),
    _needle(
        "The recipe for Gorsebrook stew begins with roasting two onions until they turn black at the edges.",
        "How does the recipe for Gorsebrook stew begin?",
        "with roasting two onions until they turn black at the edges",
        "phrase",
    ),
)

NEEDLE_BANK: tuple[Needle, ...] = tuple(needle for needle, _ in _BANK)
ANSWER_KINDS: dict[str, str] = {needle.real_needle: kind for needle, kind in _BANK}  # answer -> its kind
NEEDLE_SPLITS: dict[str, tuple[Needle, ...]] = {
    "bank": NEEDLE_BANK,
    "bank-a": NEEDLE_BANK[:20],
    "bank-b": NEEDLE_BANK[20:],
}
