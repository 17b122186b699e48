"""Writes infra/requests.txt: the short English requests for a review or an opinion that `python -m infra.world
--model M` prompts a real model with (issue: "a few thousand short English requests", shipped in the repository
so that every clone builds its world from the same prompts). Templates x subjects, deduplicated, shuffled with a
fixed seed; rerun it only to change the set.

    python experiments/make_requests.py
"""

import os
import random

TEMPLATES = """What do you think of {x}?
Write a one-sentence review of {x}.
Give me your honest opinion of {x} in one sentence.
In a sentence or two, how would you describe {x} to a friend?
Is {x} worth it? Answer briefly.
Share a short opinion about {x}.
Write a short review of {x}.
How do you feel about {x}? Keep it short.
Describe your impression of {x} in one sentence.
Tell me briefly what you think about {x}.
Write two sentences reviewing {x}.
What is your take on {x}, in a sentence?
Would you recommend {x}? Say why in one sentence.
Sum up your opinion of {x} in a few words.
Write a quick review of {x} for a blog.
What is one thing you would say about {x}?
Rate {x} and explain in one sentence.
Give a short verdict on {x}.
How was {x}? Answer in one or two sentences.
Write a brief comment about {x}.
Describe {x} in a short sentence, with your opinion.
What would you tell someone who asked about {x}? Be brief.
Write one sentence about whether you like {x}.
Give a short, honest review of {x}.
Briefly, what is your opinion on {x}?""".splitlines()

SUBJECTS = """the movie you watched last weekend|a rainy day in the city|the new coffee shop downtown
|a long train journey|the last book you read|a picnic in the park|online shopping|working from home
|a crowded beach in summer|homemade pizza|an old black-and-white film|a science fiction novel
|a morning run|a museum of modern art|a family road trip|a small mountain village|street food
|a jazz concert|a cheap hotel room|a fancy restaurant|learning a new language|a video game sequel
|the latest smartphone|a used car|a winter holiday|public transport|a documentary about the ocean
|a horror movie|a romantic comedy|a cooking class|a long-distance flight|camping|a farmers market
|a theme park|a budget airline|a children's cartoon|a classic rock album|a yoga class|an electric scooter
|a noisy neighbor|a surprise party|a thunderstorm|a spicy curry|a vegan burger|fast food
|a library on a Sunday|a bike ride along the river|a city at night|a cup of green tea
|an opera performance|a stand-up comedy show|a detective series|a fantasy trilogy|a podcast about history
|a board game night|a music festival|a ski resort|a quiet cafe|a new laptop|wireless earbuds|a smartwatch
|a mechanical keyboard|a paper notebook|a houseplant|a pet cat|a pet dog|a garden in spring|autumn leaves
|a snowy morning|a hot summer afternoon|an early flight|a late-night bus|a job interview
|a first day at work|a group project|a school reunion|a wedding reception|a birthday cake
|chocolate ice cream|a bowl of ramen|sushi|a croissant|a street market|a castle tour|a boat trip
|a zoo visit|an aquarium|a botanical garden|a science museum|a painting class|a dance lesson
|a piano recital|a choir concert|a karaoke night|a trivia quiz|a crossword|a mystery novel|a poetry book
|a travel guide|a cookbook|a biography|a self-help book|a graphic novel|a superhero movie
|an animated film|a war drama|a musical|a sports documentary|a reality show|a sitcom|a soap opera
|a nature series|a cooking show|a football match|a tennis final|a marathon|a chess tournament
|a swimming pool|a gym membership|a hiking trail|a lake at sunset|a desert road|a rainforest tour
|a lighthouse|a small bookstore|a vintage shop|a shopping mall|an airport lounge|a train station
|a hotel breakfast|a bed and breakfast|a youth hostel|a cruise ship|a cable car|a hot air balloon ride
|a pottery workshop|a photography walk|a wine tasting|a craft beer|a fresh smoothie|a homemade soup
|a barbecue|a pancake breakfast|a salad bar|a food truck|an Italian restaurant|a Mexican taco stand
|a bakery|a tea house|a rooftop bar|a night market|a city park|a public library|a community garden
|a second-hand bicycle|an old camera|a vinyl record|a radio show|a newspaper column|a magazine interview
|a video call with friends|a handwritten letter|a long weekend|a day off|a lazy Sunday|a busy Monday""".replace(
    "\n", ""
).split("|")


def main():
    requests = sorted({t.format(x=s.strip()) for t in TEMPLATES for s in SUBJECTS})
    random.Random(0).shuffle(requests)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "infra", "requests.txt")
    with open(path, "w") as f:
        f.write("\n".join(requests) + "\n")
    print(f"{len(requests)} requests ({len(TEMPLATES)} templates x {len(SUBJECTS)} subjects) -> {path}")


if __name__ == "__main__":
    main()
