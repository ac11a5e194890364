//! Text workloads for `lumen bench` (`--dataset-name`, as vLLM's benchmark names its datasets):
//! `edit`, requests whose answer repeats most of their prompt (a text to copy with one word
//! replaced: what code editing and rewriting look like to a speculative proposer), and `chat`,
//! open questions whose answers repeat nothing in particular. `random` (the default) stays the
//! random token ids of `workload`.
//!
//! Everything is a pure function of the seed.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// What the benchmark's prompts are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Dataset {
    /// Random token ids of `--input-len` (no two requests share a prefix).
    #[default]
    Random,
    /// A paragraph to repeat with one word replaced (the answer copies the prompt).
    Edit,
    /// Open questions (the answer copies little).
    Chat,
}

const SENTENCES: &[&str] = &[
    "The river runs past the old mill, where the miller still grinds wheat for the village bakery every morning.",
    "In the spring the hills turn green, and the shepherds move their flocks to the high meadows above the river.",
    "The library on the main square keeps a collection of maps that show how the river changed its course.",
    "Every Saturday the market fills the square with stalls of cheese, bread, honey and vegetables from the valley.",
    "The bridge was rebuilt in stone after the flood, and its three arches are wide enough for the barges to pass.",
    "Children from the village walk to the school on the hill, crossing the bridge and the orchard on their way.",
    "At night the lamps along the river are lit one by one, and their light shines on the water until dawn.",
    "The baker opens his shop before sunrise, and the smell of fresh bread reaches the far end of the street.",
    "Travellers who stop at the inn by the bridge are told the story of the flood and the rebuilding of the village.",
    "The orchard behind the church grows apples and pears, and in autumn the whole village helps with the harvest.",
    "A narrow road climbs from the square to the castle, whose towers can be seen from every part of the valley.",
    "The musicians play in the square on summer evenings, and people dance until the church bell rings midnight.",
];

/// Words of [`SENTENCES`] an `edit` prompt asks to replace, with their replacements.
const REPLACEMENTS: &[(&str, &str)] = &[
    ("river", "stream"),
    ("village", "town"),
    ("bridge", "crossing"),
    ("square", "plaza"),
    ("bread", "loaves"),
    ("valley", "dale"),
];

const QUESTIONS: &[&str] = &[
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how vaccines train the immune system, for a curious twelve-year-old.",
    "Describe three ways a small city could reduce its traffic, with their trade-offs.",
    "What would daily life be like on a research station in Antarctica?",
    "Compare the advantages of learning to play the piano and the guitar.",
    "Invent a new board game and explain its rules.",
    "Why do some birds migrate thousands of kilometres every year?",
    "Give advice to someone starting their first job as a software engineer.",
];

/// `n` chat messages of `dataset` (`Random` has none: its prompts are token ids).
pub fn text_prompts(dataset: Dataset, n: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5EED_DA7A);
    (0..n)
        .map(|_| match dataset {
            Dataset::Random => String::new(),
            Dataset::Edit => {
                let count = rng.random_range(6..=9);
                let mut picked: Vec<&str> = Vec::with_capacity(count);
                while picked.len() < count {
                    let s = SENTENCES[rng.random_range(0..SENTENCES.len())];
                    if !picked.contains(&s) {
                        picked.push(s);
                    }
                }
                let text = picked.join(" ");
                let (from, to) = *REPLACEMENTS
                    .iter()
                    .filter(|(from, _)| text.contains(from))
                    .nth(
                        rng.random_range(0..REPLACEMENTS.len())
                            % REPLACEMENTS.iter().filter(|(f, _)| text.contains(f)).count().max(1),
                    )
                    .unwrap_or(&REPLACEMENTS[0]);
                format!(
                    "Rewrite the following text exactly as it is, except that every \"{from}\" becomes \"{to}\". \
                     Output only the rewritten text.\n\n{text}"
                )
            }
            Dataset::Chat => QUESTIONS[rng.random_range(0..QUESTIONS.len())].to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_prompts_hold_a_text_to_copy_and_a_word_of_it_to_replace() {
        let prompts = text_prompts(Dataset::Edit, 20, 1);
        assert_eq!(prompts, text_prompts(Dataset::Edit, 20, 1), "a function of the seed");
        for p in &prompts {
            let (instruction, text) = p.split_once("\n\n").unwrap();
            let from = instruction.split('"').nth(1).unwrap();
            assert!(text.contains(from), "{from} is in the text: {p}");
            assert!(text.split(". ").count() >= 6, "six sentences or more: {text}");
        }
        let distinct: std::collections::HashSet<_> = prompts.iter().collect();
        assert!(distinct.len() > 15, "prompts differ");
        assert!(text_prompts(Dataset::Chat, 5, 2).iter().all(|q| QUESTIONS.contains(&q.as_str())));
    }
}
