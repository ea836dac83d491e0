// TEMPORARY placeholder until the real compiler lands (being written now).
pub enum Action { Allow, Errno(u16), KillProcess }
pub struct Filter;
#[derive(Debug)]
pub struct FilterError;
impl std::fmt::Display for FilterError { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("placeholder") } }
pub struct Program { insns: Vec<libc::sock_filter> }
impl Filter { pub fn compile(&self) -> Result<Program, FilterError> { Err(FilterError) } }
impl Program {
  pub fn as_fprog(&self) -> libc::sock_fprog { libc::sock_fprog { len: self.insns.len() as u16, filter: self.insns.as_ptr() as *mut _ } }
  pub fn install(&self) -> std::io::Result<()> { Err(std::io::Error::other("placeholder")) }
}
